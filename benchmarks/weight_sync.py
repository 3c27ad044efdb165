"""Weight sync: seconds to move the policy learner's weights into N vLLM rollout workers (N = 1..4), per
strategy (bucketed Ray object store at two bucket sizes, disk), for two model sizes; bytes/s against a plain
in-memory copy (`torch.clone` of the same tensors in one process) measured in the same run.

Each sync is the system's own path, the strategy's `publish_from(learner)` then `apply` on the first N
workers of one pool of 4 (what `RolloutPool.sync_from` does for all of its workers): the learner actor exports
its weights (object store: its buckets, each into the object store once; disk: a safetensors checkpoint),
and every worker reloads its vLLM engine in place. The issue's goals: the object store at least 50% of the
clone's bandwidth, and flat in N up to 4. The arms are interleaved, reversing order each repeat. At the end
the learner's weights are perturbed and synced once more per strategy into all 4 workers, and every worker's
weight checksum must then equal the learner's: the timed path really moves the weights.

Time it on a quiet machine only (load average under 1.5, recorded at every timing).

    .venv/bin/python -m benchmarks.weight_sync [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from benchmarks.common import (
    BenchmarkRun,
    Trial,
    actor_process_info,
    add_niceness_argument,
    base_parser,
    interleave,
    median,
    ratio_summary,
    set_ray_worker_niceness,
    start_local_ray,
)
from benchmarks.rollout_throughput import start_pool
from benchmarks.tiny_models import BUILTIN, MODELS, model_dir, parameter_bytes

SEED = 0
# Object-store arms at the default bucket (rollout.sync_bucket_mb) and at a small one (several buckets even for
# the larger model), and disk.
STRATEGIES = ("object_store 256 MiB", "object_store 32 MiB", "disk")
WORKER_COUNTS = (1, 2, 3, 4)
CLONE_ARM = "in-memory clone"
# The default object-store sync once more, timed stage by stage (issue 12: where the bandwidth goes).
STAGED = "object_store 256 MiB"
STAGES = ("export", "fetch", "unpack", "copy", "reload")


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=[BUILTIN, "llama-4L-h512-v30k"], choices=[BUILTIN, *MODELS])
    add_niceness_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.models, args.worker_counts = 1, [BUILTIN], (1, 2)
    else:
        args.worker_counts = WORKER_COUNTS
    return args


def start_learner(path: str) -> Any:
    import ray

    from apo_ray.actors.policy import PolicyLearner
    from apo_ray.cluster import actor_env
    from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig

    remote = ray.remote(PolicyLearner).options(num_cpus=1, runtime_env={"env_vars": actor_env()})
    return remote.remote(
        path, model=ModelConfig(), policy=PolicyConfig(), learner=LearnerConfig(backend="torch"), seed=SEED
    )


# Far below the 1% perturbation that a missed sync would leave.
CHECKSUM_REL_TOL = 1e-4


def learner_checksum(learner: Any) -> float:
    import ray

    def checksum(policy_learner) -> float:
        return sum(p.detach().double().abs().sum().item() for p in policy_learner.model.parameters())

    return ray.get(learner.__ray_call__.remote(checksum))


def perturb(learner: Any) -> None:
    import ray
    import torch

    def scale(policy_learner) -> None:
        with torch.no_grad():
            for p in policy_learner.model.parameters():
                p.mul_(1.01)

    ray.get(learner.__ray_call__.remote(scale))


def load_in_stages(worker: Any, version: int, refs: list) -> dict[str, float]:
    """A rollout worker's half of an object-store sync (apo_ray/sync_backends/object_store.py receive), stage by stage:
    reading the buckets out of the object store, viewing them as tensors, and vLLM's in-place reload. `copy`
    clones the same tensors in the worker's process, the plain memory-copy floor beside the reload."""
    import time

    import ray

    from apo_ray.named_tensors import unpack_bucket

    started = time.perf_counter()
    buckets = ray.get(refs)
    fetched = time.perf_counter()
    pairs = [pair for bucket in buckets for pair in unpack_bucket(bucket)]
    unpacked = time.perf_counter()
    copies = [tensor.clone() for _, tensor in pairs]
    copied = time.perf_counter()
    del copies
    worker.engine.load(pairs)
    worker._version = version
    return {
        "fetch": fetched - started,
        "unpack": unpacked - fetched,
        "copy": copied - unpacked,
        "reload": time.perf_counter() - copied,
    }


def make_strategies(scratch, name: str) -> dict[str, Any]:
    from apo_ray.sync_backends.disk import DiskSync
    from apo_ray.sync_backends.object_store import ObjectStoreSync

    return {
        "object_store 256 MiB": ObjectStoreSync(bucket_bytes=256 * 2**20),
        "object_store 32 MiB": ObjectStoreSync(bucket_bytes=32 * 2**20),
        "disk": DiskSync(root=scratch / f"sync-{name}"),
    }


def measure_model(name: str, args: argparse.Namespace, scratch) -> dict[str, Any]:
    import time

    import ray
    import torch

    path = str(model_dir(name, scratch))
    print(f"[{name}] starting the learner and a pool of {max(args.worker_counts)} workers ...", flush=True)
    learner = start_learner(path)
    pool = start_pool(path, "vllm", max(args.worker_counts))
    strategies = make_strategies(scratch, name)
    versions = itertools.count(1)
    # The tensors a sync moves, fetched once: the baseline copies exactly these.
    weights = ray.get(learner.state_dict.remote())
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in weights.values()}.values())

    def sync(strategy: str, n: int):
        def call(repeat: int) -> dict[str, float]:
            chosen, version = strategies[strategy], next(versions)
            started = time.perf_counter()
            payload = chosen.publish_from(learner, version)
            loaded = ray.get(chosen.apply(pool.workers[:n], payload, version))
            seconds = time.perf_counter() - started
            chosen.release(payload)
            return {"timing/sync": seconds, "sync/bytes": float(max(loaded))}

        return call

    def staged(n: int):
        def call(repeat: int) -> dict[str, float]:
            chosen, version = strategies[STAGED], next(versions)
            started = time.perf_counter()
            payload = chosen.publish_from(learner, version)
            exported = time.perf_counter() - started
            # The refs travel inside a list, so Ray leaves them unresolved until the worker's own ray.get.
            stages = ray.get([w.__ray_call__.remote(load_in_stages, version, payload) for w in pool.workers[:n]])
            seconds = time.perf_counter() - started
            chosen.release(payload)
            slowest = {f"stage/{k}": max(s[k] for s in stages) for k in STAGES[1:]}
            # What is left is the calls' dispatch and the waiting on the slowest worker (copy included: it ran).
            dispatch = seconds - exported - max(sum(s.values()) for s in stages)
            return {"stage/export": exported, **slowest, "stage/dispatch": dispatch}

        return call

    def clone(repeat: int) -> dict[str, float]:
        with torch.no_grad():
            copies = {k: v.clone() for k, v in weights.items()}
        return {"sync/bytes": float(sum(t.numel() * t.element_size() for t in copies.values()))}

    arms = {f"{strategy} x{n}": sync(strategy, n) for strategy in STRATEGIES for n in args.worker_counts}
    arms.update({f"stages x{n}": staged(n) for n in (1, max(args.worker_counts))})
    arms[CLONE_ARM] = clone
    processes = actor_process_info({"learner": learner, **{f"worker {i}": w for i, w in enumerate(pool.workers)}})
    try:
        for arm in arms.values():  # warm-up: first reloads pay one-time allocations
            arm(-1)
        trials = interleave(arms, args.repeats)
        verified = {}
        for strategy in STRATEGIES:
            perturb(learner)
            pool.sync_from(learner, next(versions), weight_sync=strategies[strategy])
            expected = learner_checksum(learner)
            got = ray.get([w.weights_checksum.remote() for w in pool.workers])
            relative = max(abs(g - expected) / expected for g in got)
            verified[strategy] = {
                "learner": expected,
                "workers": got,
                "max_relative_difference": relative,
                "match": relative < CHECKSUM_REL_TOL,
            }
    finally:
        pool.shutdown()
        ray.kill(learner)
    return {
        "model": name,
        "parameter_bytes": parameter_bytes(path),
        "state_dict_bytes": nbytes,
        "trials": trials,
        "verified": verified,
        "processes": processes,
    }


def main() -> None:
    args = parse_args()
    set_ray_worker_niceness(args.ray_worker_niceness)
    run = BenchmarkRun("weight_sync", "Weight sync: policy learner to N vLLM rollout workers", args)
    import ray

    # Logical CPUs: the learner and the pool's workers stay up together.
    start_local_ray(1 + max(args.worker_counts))
    try:
        measured = [measure_model(name, args, run.scratch) for name in args.models]
    finally:
        ray.shutdown()
    run.finish(summarize(args, run, measured))


def stage_row(model: str, n: int, trials: list[Trial], clone_s: list[float]) -> tuple[list[Any], dict[str, float]]:
    """The staged arm's median seconds per stage, their sum without the worker's copy (the sync itself), the
    reload's cost over a plain copy of the same tensors, and the share of the clone's bandwidth that the sync
    would reach with vLLM's reload taken out (what the transport alone delivers)."""
    results = [t.result for t in trials if t.arm == f"stages x{n}"]
    stage_s = {k: median([r[f"stage/{k}"] for r in results]) for k in (*STAGES, "dispatch")}
    sync_s = sum(v for k, v in stage_s.items() if k != "copy")
    transport_share = median(clone_s) / (sync_s - stage_s["reload"])
    row = [model, n, *stage_s.values(), sync_s, stage_s["reload"] / stage_s["copy"], transport_share]
    return row, {**stage_s, "sync": sync_s, "transport_share_of_clone_bandwidth": transport_share}


def summarize(args: argparse.Namespace, run: BenchmarkRun, measured: list[dict]) -> dict[str, Any]:
    rows, stage_rows, results = [], [], []
    for m in measured:
        trials: list[Trial] = m["trials"]

        def seconds(arm: str) -> list[float]:
            # B023: seconds() is called only within this iteration, while `trials` is this model's.
            ordered = sorted((t for t in trials if t.arm == arm), key=lambda t: t.repeat)  # noqa: B023
            return [t.result["timing/sync"] if "timing/sync" in t.result else t.timing.seconds for t in ordered]

        clone_s = seconds(CLONE_ARM)
        nbytes = m["state_dict_bytes"]
        per_arm = {}
        for strategy in STRATEGIES:
            for n in args.worker_counts:
                arm = f"{strategy} x{n}"
                s = seconds(arm)
                slowdown = ratio_summary(s, clone_s)
                # The share of the clone's bandwidth, repeat by repeat (clone seconds over sync seconds).
                share = ratio_summary(clone_s, s)
                per_arm[arm] = {
                    "seconds": s,
                    "bytes_per_s": [nbytes / x for x in s],
                    "over_clone": slowdown,
                    "share_of_clone_bandwidth": share,
                }
                rows.append(
                    [
                        m["model"],
                        nbytes / 2**20,
                        strategy,
                        n,
                        median(s),
                        nbytes / median(s) / 2**20,
                        n * nbytes / median(s) / 2**20,
                        slowdown["median"],
                        f"{share['median']:.2f} ({share['min']:.2f}-{share['max']:.2f})",
                        f"{'yes' if m['verified'][strategy]['match'] else 'NO'} "
                        f"({m['verified'][strategy]['max_relative_difference']:.1e})",
                    ]
                )
        rows.append(
            [
                m["model"],
                nbytes / 2**20,
                CLONE_ARM,
                "-",
                median(clone_s),
                nbytes / median(clone_s) / 2**20,
                None,
                1.0,
                "1",
                "-",
            ]
        )
        per_arm[CLONE_ARM] = {"seconds": clone_s, "bytes_per_s": [nbytes / x for x in clone_s]}
        for n in (1, max(args.worker_counts)):
            row, per_arm[f"stages x{n}"] = stage_row(m["model"], n, trials, clone_s)
            stage_rows.append(row)
        results.append(
            {
                "model": m["model"],
                "state_dict_bytes": nbytes,
                "safetensors_bytes": m["parameter_bytes"],
                "arms": per_arm,
                "verified": m["verified"],
                "processes": m["processes"],
                "trials": [
                    {"arm": t.arm, "repeat": t.repeat, "timing": t.timing.to_dict(), "stats": t.result} for t in trials
                ],
            }
        )
    loads = [t.timing.load_start for m in measured for t in m["trials"]]
    run.add_text(
        f"Models: the builtin tiny policy and a random Llama (4 layers, hidden 512, 30,522-token vocabulary, tied "
        f"embeddings), fp32. Learner: a PolicyLearner actor (torch engine, num_cpus=1); workers: one pool of "
        f"{max(args.worker_counts)} vLLM (CPU) rollout workers, num_cpus=1 each, synced N at a time; actors at "
        f"niceness {args.ray_worker_niceness}, like the driver that "
        f"times the clone. {args.repeats} interleaved repeats after one warm-up per arm; "
        f"medians shown. Load average during the timings: {min(loads):.1f}-{max(loads):.1f} on 2 cores."
    )
    run.add_table(
        "Seconds per sync and throughput",
        [
            "model",
            "MiB",
            "strategy",
            "workers",
            "seconds",
            "MiB/s (model)",
            "MiB/s delivered (x workers)",
            "x slower than clone",
            "share of clone bandwidth (range)",
            "checksum verified",
        ],
        rows,
        note="A sync's seconds cover the learner exporting its weights (object store: packing them into buckets of "
        "the size named), the transfer, every worker's in-place vLLM reload (which re-packs weights for the CPU "
        "kernels) and the version bookkeeping. 'MiB/s (model)' over the clone's is the bandwidth ratio the issue "
        "asks to be at least 0.5 for the object store, flat in the number of workers. The in-memory clone "
        "is `tensor.clone()` of the same state dict in the driver: the machine's plain memory-copy speed. "
        "'checksum verified': after scaling the learner's weights by 1.01 and one more sync, every worker's "
        f"sum |w| is within {CHECKSUM_REL_TOL:g} (relative) of the learner's (the largest relative difference "
        "in brackets); a worker that missed the sync would be off by 1e-2. The workers' sum reads packed "
        "weights back through vLLM's CPU GEMM kernel, so it is not bit-exact on the larger model.",
    )
    run.add_table(
        f"Where a sync's time goes ({STAGED}, median seconds)",
        [
            "model",
            "workers",
            *STAGES,
            "dispatch + wait",
            "sync (no copy)",
            "reload / copy",
            "transport's share of clone bandwidth",
        ],
        stage_rows,
        note="The default object-store sync once more, stage by stage, interleaved with the arms above: `export` is "
        "the learner packing its weights into buckets and putting them into the object store (the driver "
        "waits for every bucket); on each worker, `fetch` reads the buckets out of the object store, `unpack` "
        "views them as tensors, `reload` is vLLM's in-place reload of those tensors; `dispatch + wait` is the "
        "rest of the call. Worker stages are the slowest worker's. `copy` (not part of a sync) clones the same "
        "tensors in the worker's process: 'reload / copy' is what vLLM's reload costs over a plain memory copy. "
        "The last column is the clone's seconds over the sync's without the reload: the share of the clone's "
        "bandwidth that the transport itself reaches.",
    )
    synced = [arm for arm in results[0]["arms"] if arm != CLONE_ARM and not arm.startswith("stages")]
    labels = [f"{r['model'].split('-')[0]} {arm}" for r in results for arm in synced]
    values = [median(r["arms"][arm]["seconds"]) for r in results for arm in synced]
    run.add_bar_chart(
        "weight_sync_seconds.png",
        labels,
        values,
        ylabel="seconds per sync",
        title="Weight sync to N vLLM workers (median)",
    )
    return {"settings": {k: str(v) if k == "out" else v for k, v in vars(args).items()}, "models": results}


if __name__ == "__main__":
    main()
