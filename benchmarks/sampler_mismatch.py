"""The gap between the rollout engine's log-probs and the learner's, and what truncated importance sampling
(`ppo.tis`) does about it, on online PPO on the builtin task.

Arms, each a real run of `configs/ppo.yaml` (vLLM rollouts, DeepSpeed learners) for the same seeds:
- `fp32 sampler`: vLLM and the learners in float32 (the CPU default): the gap is rounding only;
- `bf16 sampler + TIS`: vLLM in bfloat16 (`rollout.dtype=bfloat16`), learners in float32, TIS on (default);
- `bf16 sampler, no TIS`: the same with `ppo.tis=false`.
Per run: `rollout/logprob_diff` (mean |sampler - learner| per token) and its max, the TIS weights, and the
final gold score and held-out KL. Comparisons are paired by seed, with 95% t-intervals.

    .venv/bin/python -m benchmarks.sampler_mismatch [--quick] [--seeds 0 1 2] [--iterations 10]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from apo_ray.logs import configure_logging
from benchmarks.common import REPO_ROOT, BenchmarkRun, base_parser, mean_ci, start_ray_with_retries

ARMS = {
    "fp32 sampler": [],
    "bf16 sampler + TIS": ["rollout.dtype=bfloat16", "ppo.tis=true"],
    "bf16 sampler, no TIS": ["rollout.dtype=bfloat16", "ppo.tis=false"],
}
PER_ITERATION = (
    "rollout/logprob_diff",
    "rollout/logprob_diff_max",
    "policy/tis_weight_mean",
    "policy/tis_clipped_fraction",
)


def play(arm: str, seed: int, iterations: int, run: BenchmarkRun) -> dict[str, Any]:
    from apo_ray.config import load_config
    from apo_ray.metrics import read_metrics_jsonl
    from apo_ray.train import prepare
    from apo_ray.train import run as train

    run_dir = run.scratch / f"{arm.replace(' ', '_').replace(',', '').replace('+', 'and')}-s{seed}"
    overrides = [
        f"seed={seed}",
        f"rounds={iterations}",
        f"eval_every={iterations}",
        f"checkpoint_every={iterations}",
        f"run_dir={run_dir}",
        "logging.report=false",
        "logging.ray_metrics=false",
        "logging.tensorboard=false",
        *ARMS[arm],
    ]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    train(prepare(load_config(REPO_ROOT / "configs/ppo.yaml", overrides)))
    rows = read_metrics_jsonl(run_dir / "metrics.jsonl")
    iterations_rows = [r for r in rows if r["round"] > 0]
    out = {
        key: float(np.mean([r[key] for r in iterations_rows if key in r]))
        for key in PER_ITERATION
        if any(key in r for r in iterations_rows)
    }
    out["rollout/logprob_diff_max"] = max(r["rollout/logprob_diff_max"] for r in iterations_rows)
    out["final/eval/gold_score"] = rows[-1]["eval/gold_score"]
    out["final/eval/kl"] = rows[-1]["eval/kl"]
    out["start/eval/gold_score"] = rows[0]["eval/gold_score"]
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    configure_logging(False)
    if args.quick:
        args.seeds, args.iterations = args.seeds[:1], 2
    run = BenchmarkRun("sampler_mismatch", "Sampler vs learner log-probs, and truncated importance sampling", args)
    from apo_ray.cluster import init_ray
    from apo_ray.config import load_config

    start_ray_with_retries(lambda: init_ray(load_config(REPO_ROOT / "configs/ppo.yaml")))
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
    # Seed-major: the arms of one seed run back to back, so a slow spell of the machine hits all of them.
    for seed in args.seeds:
        for arm in ARMS:
            print(f"[sampler_mismatch] {arm}, seed {seed}", flush=True)
            runs[arm][seed] = play(arm, seed, args.iterations, run)

    keys = [*PER_ITERATION, "final/eval/gold_score", "final/eval/kl"]
    summary = {
        arm: {
            k: mean_ci([r[k] for r in by_seed.values() if k in r])
            for k in keys
            if any(k in r for r in by_seed.values())
        }
        for arm, by_seed in runs.items()
    }
    tis, no_tis = runs["bf16 sampler + TIS"], runs["bf16 sampler, no TIS"]
    paired = {
        k: mean_ci([tis[s][k] - no_tis[s][k] for s in args.seeds]) for k in ("final/eval/gold_score", "final/eval/kl")
    }

    def cell(stat: dict[str, float], digits: int = 4) -> str:
        if math.isnan(stat["stderr"]):
            return f"{stat['mean']:.{digits}g}"
        return f"{stat['mean']:.{digits}g} ± {stat['stderr']:.2g}"

    headers = [
        "arm",
        "logprob_diff (mean)",
        "logprob_diff (max)",
        "TIS weight",
        "TIS clipped",
        "final gold",
        "final KL",
    ]
    rows = [[arm, *(cell(s[k]) if k in s else "-" for k in keys)] for arm, s in summary.items()]
    run.add_table(
        f"Per arm, mean ± standard error over seeds {args.seeds}, {args.iterations} PPO iterations",
        headers,
        rows,
        note="logprob_diff: per-token |sampler - learner| log-prob of the sampled tokens on the same "
        "weights, averaged over iterations (max: the largest token of any iteration). TIS weight: "
        "mean min(pi_learner / pi_sampler, 2), measured in every arm, applied to the loss only "
        "with TIS on; TIS clipped: the fraction of tokens whose ratio exceeds the cap.",
    )
    run.add_table(
        "TIS minus no TIS (bf16 sampler), paired by seed",
        ["metric", "mean", "95% t-interval"],
        [[k, f"{v['mean']:.3f}", f"[{v['lo']:.3f}, {v['hi']:.3f}]"] for k, v in paired.items()],
    )
    run.finish(
        {
            "seeds": args.seeds,
            "iterations": args.iterations,
            "runs": runs,
            "summary": summary,
            "paired_tis_minus_no_tis": paired,
        }
    )


if __name__ == "__main__":
    main()
