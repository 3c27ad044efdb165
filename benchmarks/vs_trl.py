"""apo-ray's learner steps against TRL's trainers: same tiny model, data and batch size, fp32 on CPU.

- DPO: `PolicyLearner.dpo_step` (torch and DeepSpeed ZeRO-2 engines) vs TRL `DPOTrainer` (sigmoid loss,
  precompute_ref_log_probs=True, so both arms train against reference log-probs computed beforehand).
- RM: `RewardLearner.apo_step` with human pairs only (the part TRL also has) vs TRL `RewardTrainer`,
  on the same token ids.

Every arm runs in a fresh process (no thread settings, DeepSpeed process group or allocator state carried
from another arm), with the same torch thread count; the arms are interleaved, reversing their order every
repeat. The headline is training pairs/s of the training call alone; model loading and the reference
log-prob pass are timed separately.

    .venv/bin/python -m benchmarks.vs_trl [--quick] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
from typing import Any

from apo_ray.game import PreferencePair
from benchmarks.common import BenchmarkRun, Trial, base_parser, interleave, median, ratio_summary, run_isolated, timed

SEED = 0
STEPS = ("dpo", "rm")
ARMS = ("apo-ray torch", "apo-ray deepspeed", "trl")


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=400, help="training pairs (the builtin task's human pairs)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--epochs", type=int, default=4,
                        help="passes over the pairs per timed call (longer calls: less noise from a changing load)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every arm (1: what a Ray actor with num_cpus=1 gets)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.pairs, args.epochs = 1, 64, 1
    return args


def _start_process(threads: int) -> None:
    import os

    import torch

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------- arms
# Module-level functions: each runs in its own spawned process (common.run_isolated).


def apo_ray_dpo(backend: str, policy_dir: str, pairs: list[PreferencePair], batch_size: int, epochs: int, lr: float,
                threads: int) -> dict[str, Any]:
    _start_process(threads)
    from actors.policy import PolicyLearner
    from actors.reference import ReferenceModel
    from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig

    model_cfg = ModelConfig()
    with timed() as setup:
        reference = ReferenceModel(policy_dir, model=model_cfg)
        learner = PolicyLearner(policy_dir, model=model_cfg, policy=PolicyConfig(lr=lr, batch_size=batch_size),
                                learner=LearnerConfig(backend=backend), seed=SEED)
    prompts = [p.prompt for p in pairs]
    with timed() as reference_pass:
        ref_chosen = reference.sequence_logprobs(prompts, [p.chosen for p in pairs])
        ref_rejected = reference.sequence_logprobs(prompts, [p.rejected for p in pairs])
    with timed() as train:
        stats = learner.dpo_step(pairs, ref_chosen, ref_rejected, epochs=epochs, seed=SEED)
    return {"setup": setup.timing, "reference": reference_pass.timing, "train": train.timing,
            "loss": stats["policy/loss"], "steps": stats["policy/steps"]}


def trl_dpo(policy_dir: str, pairs: list[PreferencePair], batch_size: int, epochs: int, lr: float,
            threads: int) -> dict[str, Any]:
    _start_process(threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from apo_ray.modeling import load_tokenizer

    with timed() as setup:
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(policy_dir)
    config = DPOConfig(
        output_dir="/tmp/apo_ray_vs_trl_dpo", per_device_train_batch_size=batch_size, num_train_epochs=epochs,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
        loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=64, max_length=None,
        bf16=False, fp16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", seed=SEED,
        use_cpu=True, dataloader_num_workers=0,
    )
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    # The constructor tokenizes and runs the reference pass (precompute_ref_log_probs).
    with timed() as reference_pass:
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    with timed() as train:
        output = trainer.train()
    return {"setup": setup.timing, "reference": reference_pass.timing, "train": train.timing,
            "loss": output.training_loss, "steps": float(output.global_step)}


def apo_ray_rm(backend: str, reward_dir: str, pairs: list[PreferencePair], batch_size: int, epochs: int, lr: float,
               threads: int) -> dict[str, Any]:
    _start_process(threads)
    from actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig

    with timed() as setup:
        learner = RewardLearner(reward_dir, reward=RewardConfig(lr=lr, batch_size=batch_size),
                                learner=LearnerConfig(backend=backend), seed=SEED)
    with timed() as train:
        stats = learner.apo_step([], pairs, apo_coef=0.0, pref_coef=1.0, epochs=epochs, seed=SEED)
    return {"setup": setup.timing, "reference": None, "train": train.timing, "loss": stats["rm/loss"],
            "steps": stats["rm/steps"]}


def trl_rm(reward_dir: str, pairs: list[PreferencePair], batch_size: int, epochs: int, lr: float,
           threads: int) -> dict[str, Any]:
    _start_process(threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from apo_ray.config import RewardConfig as ApoRewardConfig
    from apo_ray.modeling import load_tokenizer
    from benchmarks.hh_reward_model import token_ids

    with timed() as setup:
        model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
        tokenizer = load_tokenizer(reward_dir)
    # apo-ray's own encoding (its default max_length), so both arms train on identical token ids.
    max_length = ApoRewardConfig().max_length
    prompts = [p.prompt for p in pairs]
    data = Dataset.from_dict({
        "chosen_ids": token_ids(tokenizer, prompts, [p.chosen for p in pairs], max_length),
        "rejected_ids": token_ids(tokenizer, prompts, [p.rejected for p in pairs], max_length),
    })
    config = RewardConfig(
        output_dir="/tmp/apo_ray_vs_trl_rm", per_device_train_batch_size=batch_size, num_train_epochs=epochs,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, max_length=None, report_to=[], save_strategy="no", seed=SEED, use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    with timed() as train:
        output = trainer.train()
    return {"setup": setup.timing, "reference": None, "train": train.timing, "loss": output.training_loss,
            "steps": float(output.global_step)}


# ---------------------------------------------------------------------------------------------- run


def main() -> None:
    args = parse_args()
    run = BenchmarkRun("vs_trl", "apo-ray learner steps vs TRL DPOTrainer / RewardTrainer", args)
    from apo_ray.builtin_task import make_task, prepare_builtin_assets
    from apo_ray.config import PolicyConfig, RewardConfig
    from benchmarks.tiny_models import BUILTIN_CACHE, BUILTIN_SFT_STEPS

    assets = prepare_builtin_assets(BUILTIN_CACHE, seed=0, sft_steps=BUILTIN_SFT_STEPS)
    policy_dir, reward_dir = str(assets.policy_dir), str(assets.reward_dir)
    pairs = list(make_task(SEED).pairs)[: args.pairs]
    # Each side's default learning rate in apo-ray's config, for both arms (speed does not depend on it).
    dpo_lr, rm_lr = PolicyConfig().lr, RewardConfig().lr
    common = (pairs, args.batch_size, args.epochs)
    arms = {
        ("dpo", "apo-ray torch"): lambda r: run_isolated(apo_ray_dpo, "torch", policy_dir, *common, dpo_lr, args.threads),
        ("dpo", "apo-ray deepspeed"): lambda r: run_isolated(apo_ray_dpo, "deepspeed", policy_dir, *common, dpo_lr,
                                                             args.threads),
        ("dpo", "trl"): lambda r: run_isolated(trl_dpo, policy_dir, *common, dpo_lr, args.threads),
        ("rm", "apo-ray torch"): lambda r: run_isolated(apo_ray_rm, "torch", reward_dir, *common, rm_lr, args.threads),
        ("rm", "apo-ray deepspeed"): lambda r: run_isolated(apo_ray_rm, "deepspeed", reward_dir, *common, rm_lr,
                                                            args.threads),
        ("rm", "trl"): lambda r: run_isolated(trl_rm, reward_dir, *common, rm_lr, args.threads),
    }
    trials = interleave({f"{step}/{arm}": fn for (step, arm), fn in arms.items()}, args.repeats)
    run.finish(summarize(args, run, trials, len(pairs) * args.epochs))


def summarize(args: argparse.Namespace, run: BenchmarkRun, trials: list[Trial], pairs_trained: int) -> dict[str, Any]:
    def of(step: str, arm: str) -> list[Trial]:
        return sorted((t for t in trials if t.arm == f"{step}/{arm}"), key=lambda t: t.repeat)

    def rate(t: Trial) -> float:
        return pairs_trained / t.result["train"].seconds

    rows, results = [], {}
    for step in STEPS:
        trl_rates = [rate(t) for t in of(step, "trl")]
        for arm in ARMS:
            runs = of(step, arm)
            rates = [rate(t) for t in runs]
            ratio = ratio_summary(rates, trl_rates)
            reference = [t.result["reference"].seconds for t in runs if t.result["reference"] is not None]
            results[f"{step}/{arm}"] = {
                "train_pairs_per_s": rates, "median_pairs_per_s": median(rates), "ratio_to_trl": ratio,
                "reference_pass_s": reference, "final_loss": [t.result["loss"] for t in runs],
                "steps": runs[0].result["steps"],
                "runs": [{k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in t.result.items()} for t in runs],
            }
            rows.append([step.upper(), arm, median(rates), ratio["median"], f"{ratio['min']:.2f}-{ratio['max']:.2f}",
                         median(reference) if reference else None, int(runs[0].result["steps"]),
                         median([t.result["loss"] for t in runs]),
                         median([t.result["train"].load_start for t in runs])])
    run.add_text(
        f"Same data for every arm: the first {args.pairs} human preference pairs of the builtin task (prompts of at "
        f"most 10 tokens, responses of at most 23), {args.batch_size} pairs per step, {args.epochs} epoch(s) per timed "
        f"call, fp32 on CPU, TRL with "
        f"bf16=False and gradient_checkpointing=False, constant learning rate, grad clip 1.0, no weight decay. "
        f"Models: the builtin tiny policy (Llama, 2 layers, hidden 128) for DPO and the builtin tiny RM (same shape, "
        f"1-output head) for the RM step. Every arm runs in a fresh process with torch threads = {args.threads}; "
        f"{args.repeats} interleaved repeats (order reversed every repeat)."
    )
    run.add_table(
        "Training throughput (pairs/s of the training call)",
        ["step", "arm", "pairs/s (median)", "ratio to TRL (median)", "ratio range", "reference pass s",
         "optimizer steps", "final loss", "load at start"],
        rows,
        note="Ratio: per repeat, arm pairs/s over TRL pairs/s in the same repeat; >1 means faster than TRL. "
             "Reference pass: apo-ray's ReferenceModel.sequence_logprobs over chosen and rejected; TRL's "
             "DPOTrainer constructor (tokenization + precomputed reference log-probs). Neither is in pairs/s.",
    )
    labels = [f"{step.upper()} {arm}" for step in STEPS for arm in ARMS]
    values = [results[f"{step}/{arm}"]["median_pairs_per_s"] for step in STEPS for arm in ARMS]
    ranges = [(min(results[f"{s}/{a}"]["train_pairs_per_s"]), max(results[f"{s}/{a}"]["train_pairs_per_s"]))
              for s in STEPS for a in ARMS]
    run.add_bar_chart("vs_trl_throughput.png", labels, values, ylabel="training pairs/s", errors=ranges,
                      title="apo-ray vs TRL, tiny models on CPU (median, range)")
    return {"settings": vars(args) | {"out": str(args.out) if args.out else None}, "pairs_trained": pairs_trained,
            "arms": results, "trial_order": [{"arm": t.arm, "repeat": t.repeat, "wall": t.timing.to_dict()}
                                             for t in trials]}


if __name__ == "__main__":
    main()
