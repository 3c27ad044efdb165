"""Metric sinks for a run: JSONL (always), TensorBoard, wandb, and Ray dashboard gauges.

Heavy libraries (torch, wandb, ray) are imported only by the sink that needs them, so reading
metrics (e.g. for a report) stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, Protocol

from apo_ray.metric_catalog import shown_in

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

WandbMode = Literal["offline", "online", "disabled"]

# Metrics exported to the Ray dashboard / Prometheus: the catalog's "dashboard" view. Each is exported under
# prometheus_name(key), e.g. "rm/acc" -> "apo_rm_acc"; Ray itself prefixes "ray_" on its endpoint,
# so Prometheus sees "ray_apo_rm_acc". Every gauge carries the tag run=<run name>.
DASHBOARD_METRICS: tuple[str, ...] = shown_in("dashboard")
# The current phase is a state set: apo_phase{phase=<name>} is 1 for the running phase, 0 for the others.
PHASE_GAUGE = "apo_phase"


def prometheus_name(key: str) -> str:
    """Dashboard name of a metric key: "apo_" + the key with every character outside [A-Za-z0-9_] as "_"."""
    return "apo_" + re.sub(r"[^A-Za-z0-9_]", "_", key)


def _json_value(key: str, value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # numpy / torch scalars: accept anything float() understands, reject strings and tensors of size > 1
        try:
            value = float(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from error
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity; tools like jq reject them
    return value


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl. A truncated last line (crash mid-write) is ignored; any other bad line raises."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the write never finished
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


class _Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def truncate_after(self, step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per log call to run_dir/metrics.jsonl, flushed line by line."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{key: _json_value(key, value) for key, value in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> None:
        self._file.close()
        kept = [row for row in read_metrics_jsonl(self.path) if row["step"] <= step]
        partial = self.path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        os.replace(partial, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars in run_dir/tensorboard, flushed after every log call."""

    def __init__(self, run_dir: Path):
        self._log_dir = run_dir / TENSORBOARD_DIR
        self._writer = self._open()

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self._log_dir), purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()

    def truncate_after(self, step: int) -> None:
        # purge_step makes TensorBoard hide the earlier events at steps >= it, the ones the crashed run wrote
        self._writer.close()
        # Readers take event files in name order, and a name starts with the second it was opened in and ends
        # in a per-process counter: opened in the same second as the last file, the purging file could sort
        # before it ("...10" before "...9") and purge nothing. A second later it sorts after every file.
        newest = max((int(f.name.split(".")[3]) for f in self._log_dir.glob("events.out.tfevents.*")), default=0)
        while int(time.time()) <= newest:
            time.sleep(0.05)
        self._writer = self._open(purge_step=step + 1)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A wandb run writing under run_dir/wandb; offline mode needs no network (sync later with `wandb sync`)."""

    def __init__(self, run_dir: Path, project: str, mode: WandbMode, run_name: str, config: dict[str, Any]):
        import wandb

        self._run = wandb.init(project=project, mode=mode, dir=str(run_dir), name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def truncate_after(self, step: int) -> None:
        # wandb cannot drop logged steps offline; a resumed run is a new wandb run, so there is nothing to drop
        pass

    def close(self) -> None:
        self._run.finish()


class RayGaugeSink:
    """Ray application metrics (dashboard / Prometheus) for DASHBOARD_METRICS and the current phase.

    Gauges are created on first use once Ray is initialised, so the logger may be built before ray.init().
    """

    def __init__(self, run_name: str):
        self._tags = {"run": run_name}
        self._gauges: dict[str, Any] | None = None
        self._phase_gauge: Any = None
        self._phase: str | None = None

    def _ready(self) -> bool:
        import ray

        if self._gauges is None and ray.is_initialized():
            from ray.util.metrics import Gauge

            self._gauges = {
                key: Gauge(prometheus_name(key), description=f"apo-ray metric {key}", tag_keys=("run",))
                for key in DASHBOARD_METRICS
            }
            self._phase_gauge = Gauge(
                PHASE_GAUGE, description="apo-ray phase: 1 for the running phase", tag_keys=("run", "phase")
            )
        return self._gauges is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self._ready():
            return
        for key, value in metrics.items():
            if key in self._gauges:
                self._gauges[key].set(float(value), tags=self._tags)

    def set_phase(self, name: str) -> None:
        previous, self._phase = self._phase, name
        if not self._ready():
            return
        if previous is not None and previous != name:
            self._phase_gauge.set(0, tags={**self._tags, "phase": previous})
        self._phase_gauge.set(1, tags={**self._tags, "phase": name})

    def truncate_after(self, step: int) -> None:
        pass  # gauges hold only the latest value

    def close(self) -> None:
        pass


class MetricsLogger:
    """Fans each log call out to JSONL (always), TensorBoard, wandb and Ray gauges.

    wandb is used when wandb_project is given and wandb_mode is not "disabled"; "offline" writes
    under run_dir/wandb without network access, "online" streams to the project.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_mode: WandbMode = "offline",
        ray_metrics: bool = True,
        run_name: str | None = None,
        config_dict: dict[str, Any] | None = None,
    ):
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be 'offline', 'online' or 'disabled', got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or self.run_dir.name
        self._ray: RayGaugeSink | None = RayGaugeSink(self.run_name) if ray_metrics else None
        self._sinks: list[_Sink] = [JsonlSink(self.run_dir)]
        if tensorboard:
            self._sinks.append(TensorBoardSink(self.run_dir))
        if wandb_project is not None and wandb_mode != "disabled":
            self._sinks.append(WandbSink(self.run_dir, wandb_project, wandb_mode, self.run_name, config_dict or {}))
        if self._ray is not None:
            self._sinks.append(self._ray)

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument of MetricsLogger.log")
        for key, value in metrics.items():
            _json_value(key, value)  # reject non-numbers before any sink writes half a row
        for sink in self._sinks:
            sink.log(metrics, step)

    def set_phase(self, name: str) -> None:
        """Export the phase the run is in (e.g. "generate", "rm_step") to the Ray dashboard."""
        if self._ray is not None:
            self._ray.set_phase(name)

    def truncate_after(self, step: int) -> None:
        """On resume: forget what a crashed run logged after `step`, the last step it completed."""
        for sink in self._sinks:
            sink.truncate_after(step)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
