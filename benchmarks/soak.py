"""A soak: many online iterations of a small game, watched for growth in memory, file descriptors, the object
store and the round time. The goal is no upward trend.

A real run of `configs/apo_ppo.yaml` (PPO with a critic and APO reward-model steps: every actor kind an online
game has; vLLM rollouts, DeepSpeed learners, the builtin task's tiny models), shrunk so that an iteration takes
seconds. Every `--every` iterations (read from the run's metrics.jsonl as rows land) a thread of the driver
records each process's resident memory (RSS) and open file descriptors: every named Ray actor of the run (its
process id asked of the actor once) and the driver; the object store's used bytes (what `ray memory
--stats-only` reads); and the mean round time since the last record. Per series a least-squares slope over
iteration with its 95% t-interval, the records before `--warmup` left out (start-up, vLLM's first graphs,
allocator pools filling). A series "grows" when its whole interval lies above 0.

It measures memory, not speed: it may run niced on a busy machine, and its round times then say nothing of
apo-ray's speed (only whether they drift).

    .venv/bin/python -m benchmarks.soak [--quick] [--iterations 300] [--every 10] [--warmup 30]
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from apo_ray.logs import configure_logging
from benchmarks.common import (
    REPO_ROOT,
    BenchmarkRun,
    actor_process_info,
    base_parser,
    fmt,
    linear_trend,
    load_average,
    start_ray_with_retries,
)

CONFIG = REPO_ROOT / "configs/apo_ppo.yaml"
# 8 prompts x 4 samples = one minibatch of 32, one epoch: an iteration of seconds on 2 cores. The evaluation
# (small, every 50 iterations) and checkpoints stay in the loop: both could leak.
SHRINK = [
    "ppo.prompts_per_iteration=8",
    "ppo.minibatch_size=32",
    "ppo.ppo_epochs=1",
    "eval.prompts=8",
    "eval.samples_per_prompt=4",
    "eval_every=50",
    "checkpoint_every=100",
    "logging.report=false",
    "logging.ray_metrics=false",
    "logging.tensorboard=false",
]
DRIVER = "driver"
RUN_ID = re.compile(r"-[0-9a-f]{6}-")
MIB = 2**20


def process_usage(pid: int) -> dict[str, int] | None:
    """Resident bytes and open file descriptors of process `pid`, read from /proc; None once it has exited."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: /proc reads zeros
            return None
        return {"rss_bytes": process.memory_info().rss, "fds": process.num_fds()}
    except psutil.NoSuchProcess:
        return None


def object_store_used_bytes() -> int:
    """Bytes the cluster's object store holds. Ray's public API reports this only through the dashboard, which
    apo-ray's local cluster does not start; this is the raylet call that `ray memory --stats-only` makes."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


class Recorder:
    """Samples the run every `every` iterations, as the rows of `metrics_path` show them finished."""

    def __init__(self, metrics_path: Path, every: int, log=print):
        self.metrics_path, self.every, self.log = metrics_path, every, log
        self.records: list[dict[str, Any]] = []
        self.pids: dict[str, int] = {DRIVER: os.getpid()}
        self._last_round = -1
        self._stop = threading.Event()
        self._started = time.perf_counter()

    def actor_pids(self) -> dict[str, int]:
        """Every named actor's process id (the run's actors are named by role and index), asked of each actor
        once: a replaced actor has a new name."""
        import ray

        new = [name for name in ray.util.list_named_actors() if name not in self.pids]
        if new:
            info = actor_process_info({name: ray.get_actor(name) for name in new})
            self.pids.update({name: row["pid"] for name, row in info.items()})
        return self.pids

    @staticmethod
    def role(name: str) -> str:
        """`rollout-3f9a1c-0` -> `rollout-0`: the run's id (apo_ray.cluster's) left out, so that series and
        plot names are the same from run to run."""
        return RUN_ID.sub("-", name)

    def record(self, iteration: int, round_s: float | None) -> dict[str, Any]:
        processes = {
            self.role(name): usage
            for name, pid in self.actor_pids().items()
            if (usage := process_usage(pid)) is not None
        }
        row = {
            "iteration": iteration,
            "elapsed_s": round(time.perf_counter() - self._started, 1),
            "load_1min": round(load_average(), 2),
            "round_s": round_s,
            "object_store_bytes": object_store_used_bytes(),
            "processes": processes,
        }
        self.records.append(row)
        self.log(
            f"[soak] iteration {iteration}: round {fmt(round_s, 2)} s, object store "
            f"{row['object_store_bytes'] / MIB:.1f} MiB, RSS MiB "
            + ", ".join(f"{name} {usage['rss_bytes'] / MIB:.0f}" for name, usage in processes.items())
        )
        return row

    def poll(self) -> None:
        """Record once if a multiple of `every` has finished since the last record (the latest such round)."""
        from apo_ray.metrics import read_metrics_jsonl

        if not self.metrics_path.exists():
            return
        rows = [r for r in read_metrics_jsonl(self.metrics_path) if r["round"] > self._last_round]
        due = [r["round"] for r in rows if r["round"] % self.every == 0]
        if not due:
            return
        times = [r["timing/round"] for r in rows if r["round"] <= due[-1] and r["round"] > 0]
        self.record(due[-1], sum(times) / len(times) if times else None)
        self._last_round = due[-1]

    def watch(self, interval_s: float = 0.5) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.poll()
            except Exception as error:  # an actor going away at the run's end; the next poll tries again
                self.log(f"[soak] record failed: {error!r}")

    def stop(self) -> None:
        self._stop.set()


def series(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(iteration, value) per quantity: each process's RSS (MiB) and fds, the object store (MiB), round time."""
    out: dict[str, list[tuple[int, float]]] = {}

    def add(name: str, iteration: int, value: float | None) -> None:
        if value is not None:
            out.setdefault(name, []).append((iteration, value))

    for row in records:
        it = row["iteration"]
        add("object store MiB", it, row["object_store_bytes"] / MIB)
        add("round s", it, row["round_s"])
        for name, usage in row["processes"].items():
            add(f"RSS MiB {name}", it, usage["rss_bytes"] / MIB)
            add(f"fds {name}", it, usage["fds"])
    return out


def fit(points: list[tuple[int, float]], warmup: int) -> dict[str, Any] | None:
    kept = [(x, y) for x, y in points if x >= warmup]
    if len({x for x, _ in kept}) < 2 or len(kept) < 3:
        return None
    trend = linear_trend([x for x, _ in kept], [y for _, y in kept])
    span = kept[-1][0] - kept[0][0]
    return {**trend, "first": kept[0][1], "last": kept[-1][1], "span_iterations": span, "grows": trend["lo"] > 0}


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    names = sorted({name for row in records for name in row["processes"]})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "iteration",
                "elapsed_s",
                "load_1min",
                "round_s",
                "object_store_bytes",
                *(f"{name} {k}" for name in names for k in ("rss_bytes", "fds")),
            ]
        )
        for row in records:
            usage = row["processes"]
            writer.writerow(
                [
                    row["iteration"],
                    row["elapsed_s"],
                    row["load_1min"],
                    row["round_s"],
                    row["object_store_bytes"],
                    *(usage.get(name, {}).get(k, "") for name in names for k in ("rss_bytes", "fds")),
                ]
            )


def trend_plot(
    path: Path, name: str, points: list[tuple[int, float]], trend: dict[str, Any] | None, warmup: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([x for x, _ in points], [y for _, y in points], "o-", ms=3, color="#4c72b0", label="recorded")
    if trend is not None:
        xs = [x for x, _ in points if x >= warmup]
        ax.plot(
            xs,
            [trend["intercept"] + trend["slope"] * x for x in xs],
            "--",
            color="#dd8452",
            label=f"fit: {trend['slope'] * 100:+.3g} per 100 it.",
        )
    ax.axvspan(0, warmup, color="0.9", label="warm-up (not fitted)")
    ax.set_xlabel("iteration")
    ax.set_ylabel(name)
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_name(name: str) -> str:
    return "soak_" + "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") + ".png"


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="iterations between records")
    parser.add_argument("--warmup", type=int, default=30, help="records before this iteration are not fitted")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.every, args.warmup = 30, 5, 10
    if args.warmup >= args.iterations:
        parser.error(f"--warmup ({args.warmup}) must be below --iterations ({args.iterations})")
    configure_logging(False)
    run = BenchmarkRun("soak", "Soak: growth over online iterations", args)
    from apo_ray.cluster import init_ray
    from apo_ray.config import load_config
    from apo_ray.train import prepare
    from apo_ray.train import run as train

    run_dir = run.scratch / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    # One iteration past the last record: that record is then taken while every actor is still in the game,
    # not shutting down.
    cfg = load_config(CONFIG, [f"rounds={args.iterations + 1}", f"run_dir={run_dir}", *SHRINK])
    start_ray_with_retries(lambda: init_ray(cfg))
    recorder = Recorder(run_dir / "metrics.jsonl", args.every)
    watcher = threading.Thread(target=recorder.watch, name="soak-recorder", daemon=True)
    watcher.start()
    try:
        train(prepare(cfg))
    finally:
        recorder.stop()
        watcher.join()
    shutil.rmtree(run_dir, ignore_errors=True)

    records = recorder.records
    all_series = series(records)
    # The later half alone tells a cache that fills up and stops (its slope falls towards 0) from a leak (it
    # keeps its slope).
    later = (args.warmup + args.iterations) // 2
    fits = {name: fit(points, args.warmup) for name, points in all_series.items()}
    later_fits = {name: fit(points, later) for name, points in all_series.items()}

    def slope(trend: dict[str, Any] | None) -> str:
        if trend is None:
            return "too few records"
        return f"{trend['slope'] * 100:+.4g} [{trend['lo'] * 100:+.4g}, {trend['hi'] * 100:+.4g}]"

    rows = [
        [
            name,
            trend and trend["first"],
            trend and trend["last"],
            slope(trend),
            slope(later_fits[name]),
            "-" if trend is None else "grows" if trend["grows"] else "no upward trend",
        ]
        for name, trend in fits.items()
    ]
    run.add_text(
        f"`configs/apo_ppo.yaml` with {' '.join(SHRINK)}; {args.iterations} iterations, a record every "
        f"{args.every}, {len(records)} records. Slopes are fitted over iterations {args.warmup}..{args.iterations} "
        f"(the records before iteration {args.warmup} are warm-up, left out) and given per 100 iterations with "
        "their 95% t-interval, and again over the later half alone. A series grows when its whole interval lies "
        "above 0. Round times are the mean over the iterations since the previous record; on a busy machine they "
        "show drift only, not speed."
    )
    run.add_table(
        "Slopes per 100 iterations [95% interval]",
        ["series", "first fitted", "last", f"slope from {args.warmup}", f"slope from {later}", "verdict"],
        rows,
        note="The verdict is the slope from the end of the warm-up's.",
    )
    for name, points in all_series.items():
        filename = plot_name(name)
        trend_plot(run.out_dir / filename, name, points, fits[name], args.warmup)
        run.add_plot(filename, name)
    write_csv(run.out_dir / "soak.csv", records)
    run.finish(
        {
            "config": str(CONFIG.relative_to(REPO_ROOT)),
            "overrides": SHRINK,
            "iterations": args.iterations,
            "every": args.every,
            "warmup": args.warmup,
            "records": records,
            "fits": fits,
            "later_half_from": later,
            "later_fits": later_fits,
            "csv": "soak.csv",
        }
    )


if __name__ == "__main__":
    main()
