"""apo-ray's learner steps against TRL's trainers: same tiny model, data and batch size, fp32 on CPU.

- DPO: `PolicyLearner.pair_step` (torch and DeepSpeed ZeRO-2 engines) vs TRL `DPOTrainer` (sigmoid loss,
  precompute_ref_log_probs=True, so both arms train against reference log-probs computed beforehand).
- RM: `RewardLearner.apo_step` with human pairs only (the part TRL also has) vs TRL `RewardTrainer`,
  on the same token ids.

Each arm lives in its own fresh process (no thread settings, DeepSpeed process group or allocator state
shared with another arm) with the same torch thread count, and is built before any timing. Then the arms
take turns, one timed training call each (the same epochs over the same pairs), reversing the order every
repeat, so calls compared with one another run seconds apart. The headline is training pairs/s of those
calls; building the arm and the reference log-prob pass are timed once, separately.

    .venv/bin/python -m benchmarks.vs_trl [--quick] [--repeats 7] [--epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
from typing import Any

from apo_ray.game import PreferencePair
from benchmarks.common import BenchmarkRun, IsolatedObject, Trial, base_parser, interleave, median, ratio_summary, timed

SEED = 0
STEPS = ("dpo", "rm")
ARMS = ("apo-ray torch", "apo-ray deepspeed", "trl")


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=400, help="training pairs (the builtin task's human pairs)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the pairs per timed call")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every arm (1: what a Ray actor with num_cpus=1 gets)"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.pairs, args.epochs = 2, 64, 1
    return args


def _start_process(threads: int) -> None:
    import os

    import torch

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------- arms
# Each class is built inside its own spawned process (common.IsolatedObject); `train` is the timed call.


class ApoRayDpo:
    def __init__(
        self, backend: str, policy_dir: str, pairs: list[PreferencePair], batch_size: int, lr: float, threads: int
    ):
        _start_process(threads)
        from apo_ray.actors.policy import PolicyLearner
        from apo_ray.actors.reference import ReferenceModel
        from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig

        model = ModelConfig()
        with timed() as setup:
            reference = ReferenceModel(policy_dir, model=model)
            policy = PolicyConfig(lr=lr, batch_size=batch_size)
            self.learner = PolicyLearner(
                policy_dir, model=model, policy=policy, learner=LearnerConfig(backend=backend), seed=SEED
            )
        self.dpo_settings = {"beta": policy.dpo_beta}
        prompts = [p.prompt for p in pairs]
        self.chosen = self.learner.encode_texts(prompts, [p.chosen for p in pairs])
        self.rejected = self.learner.encode_texts(prompts, [p.rejected for p in pairs])
        with timed() as reference_pass:
            self.ref_chosen = reference.sequence_logprobs(self.chosen)
            self.ref_rejected = reference.sequence_logprobs(self.rejected)
        self.setup = {"build": setup.timing, "reference": reference_pass.timing}

    def train(self, epochs: int) -> dict[str, Any]:
        with timed() as t:
            stats = self.learner.pair_step(
                self.chosen,
                self.rejected,
                self.ref_chosen,
                self.ref_rejected,
                method="dpo",
                settings=self.dpo_settings,
                epochs=epochs,
                seed=SEED,
            )
        return {"train": t.timing, "loss": stats["policy/loss"], "steps": stats["policy/steps"]}

    def setup_timings(self) -> dict[str, Any]:
        return self.setup


class TrlDpo:
    def __init__(self, policy_dir: str, pairs: list[PreferencePair], batch_size: int, lr: float, threads: int):
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
            output_dir="/tmp/apo_ray_vs_trl_dpo",
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=64,
            max_length=None,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            seed=SEED,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
        # The constructor tokenizes and runs the reference pass (precompute_ref_log_probs).
        with timed() as reference_pass:
            self.trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        self.setup = {"build": setup.timing, "reference": reference_pass.timing}

    def train(self, epochs: int) -> dict[str, Any]:
        return _trl_train(self.trainer, epochs)

    def setup_timings(self) -> dict[str, Any]:
        return self.setup


class ApoRayRm:
    def __init__(
        self, backend: str, reward_dir: str, pairs: list[PreferencePair], batch_size: int, lr: float, threads: int
    ):
        _start_process(threads)
        from apo_ray.actors.reward import RewardLearner
        from apo_ray.config import LearnerConfig, RewardConfig

        with timed() as setup:
            self.learner = RewardLearner(
                reward_dir,
                reward=RewardConfig(lr=lr, batch_size=batch_size),
                learner=LearnerConfig(backend=backend),
                seed=SEED,
            )
        self.pairs = pairs
        self.setup = {"build": setup.timing, "reference": None}

    def train(self, epochs: int) -> dict[str, Any]:
        with timed() as t:
            stats = self.learner.apo_step([], self.pairs, apo_coef=0.0, pref_coef=1.0, epochs=epochs, seed=SEED)
        return {"train": t.timing, "loss": stats["rm/loss"], "steps": stats["rm/steps"]}

    def setup_timings(self) -> dict[str, Any]:
        return self.setup


class TrlRm:
    def __init__(self, reward_dir: str, pairs: list[PreferencePair], batch_size: int, lr: float, threads: int):
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
        data = Dataset.from_dict(
            {
                "chosen_ids": token_ids(tokenizer, prompts, [p.chosen for p in pairs], max_length),
                "rejected_ids": token_ids(tokenizer, prompts, [p.rejected for p in pairs], max_length),
            }
        )
        config = RewardConfig(
            output_dir="/tmp/apo_ray_vs_trl_rm",
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            max_length=None,
            report_to=[],
            save_strategy="no",
            seed=SEED,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        self.trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        self.setup = {"build": setup.timing, "reference": None}

    def train(self, epochs: int) -> dict[str, Any]:
        return _trl_train(self.trainer, epochs)

    def setup_timings(self) -> dict[str, Any]:
        return self.setup


def _trl_train(trainer: Any, epochs: int) -> dict[str, Any]:
    """One more `train()` of the same trainer: model and optimizer carry on, as apo-ray's learners do."""
    trainer.args.num_train_epochs = epochs
    with timed() as t:
        output = trainer.train()
    return {"train": t.timing, "loss": output.training_loss, "steps": float(output.global_step)}


# ---------------------------------------------------------------------------------------------- run


def main() -> None:
    args = parse_args()
    run = BenchmarkRun("vs_trl", "apo-ray learner steps vs TRL DPOTrainer / RewardTrainer", args)
    from apo_ray.builtin.assets import prepare_builtin_assets
    from apo_ray.builtin.task import make_task
    from apo_ray.config import PolicyConfig, RewardConfig
    from benchmarks.tiny_models import BUILTIN_CACHE, BUILTIN_SFT_STEPS

    assets = prepare_builtin_assets(BUILTIN_CACHE, seed=0, sft_steps=BUILTIN_SFT_STEPS)
    policy_dir, reward_dir = str(assets.policy_dir), str(assets.reward_dir)
    pairs = list(make_task(SEED).pairs)[: args.pairs]
    # Each side's default learning rate in apo-ray's config, for all arms (speed does not depend on it).
    dpo = (pairs, args.batch_size, PolicyConfig().lr, args.threads)
    rm = (pairs, args.batch_size, RewardConfig().lr, args.threads)
    builders = {
        "dpo": {
            "apo-ray torch": (ApoRayDpo, "torch", policy_dir, *dpo),
            "apo-ray deepspeed": (ApoRayDpo, "deepspeed", policy_dir, *dpo),
            "trl": (TrlDpo, policy_dir, *dpo),
        },
        "rm": {
            "apo-ray torch": (ApoRayRm, "torch", reward_dir, *rm),
            "apo-ray deepspeed": (ApoRayRm, "deepspeed", reward_dir, *rm),
            "trl": (TrlRm, reward_dir, *rm),
        },
    }
    trials, setups = [], {}
    for step in STEPS:
        print(f"[{step}] building the arms, each in its own process ...", flush=True)
        arms = {arm: IsolatedObject(*builder) for arm, builder in builders[step].items()}
        try:
            setups.update({f"{step}/{arm}": obj.call("setup_timings") for arm, obj in arms.items()})
            calls = {
                f"{step}/{arm}": lambda repeat, obj=obj: obj.call("train", args.epochs) for arm, obj in arms.items()
            }
            trials += interleave(calls, args.repeats)
        finally:
            for obj in arms.values():
                obj.close()
    run.finish(summarize(args, run, trials, setups, len(pairs) * args.epochs))


def summarize(
    args: argparse.Namespace, run: BenchmarkRun, trials: list[Trial], setups: dict[str, Any], pairs_per_call: int
) -> dict[str, Any]:
    def of(step: str, arm: str) -> list[Trial]:
        return sorted((t for t in trials if t.arm == f"{step}/{arm}"), key=lambda t: t.repeat)

    def rate(t: Trial) -> float:
        return pairs_per_call / t.result["train"].seconds

    rows, results = [], {}
    for step in STEPS:
        trl_rates = [rate(t) for t in of(step, "trl")]
        for arm in ARMS:
            runs = of(step, arm)
            rates = [rate(t) for t in runs]
            ratio = ratio_summary(rates, trl_rates)
            setup = setups[f"{step}/{arm}"]
            results[f"{step}/{arm}"] = {
                "train_pairs_per_s": rates,
                "median_pairs_per_s": median(rates),
                "ratio_to_trl": ratio,
                "build_s": setup["build"].seconds,
                "reference_pass_s": setup["reference"].seconds if setup["reference"] else None,
                "loss_per_call": [t.result["loss"] for t in runs],
                "steps_per_call": runs[0].result["steps"],
                "calls": [{"repeat": t.repeat, "train": t.result["train"].to_dict()} for t in runs],
            }
            rows.append(
                [
                    step.upper(),
                    arm,
                    median(rates),
                    ratio["median"],
                    f"{ratio['min']:.2f}-{ratio['max']:.2f}",
                    results[f"{step}/{arm}"]["reference_pass_s"],
                    int(runs[0].result["steps"]),
                    median([t.result["train"].load_start for t in runs]),
                ]
            )
    run.add_text(
        f"Same data for every arm: the first {args.pairs} human preference pairs of the builtin task (prompts of at "
        f"most 10 tokens, responses of at most 23), {args.batch_size} pairs per step, {args.epochs} epoch(s) per timed "
        f"call, fp32 on CPU, TRL with bf16=False and gradient_checkpointing=False, constant learning rate, grad clip "
        f"1.0, no weight decay. Models: the builtin tiny policy (Llama, 2 layers, hidden 128) for DPO and the builtin "
        f"tiny RM (same shape, 1-output head) for the RM step. Every arm is built once in its own process with torch "
        f"threads = {args.threads}; then {args.repeats} rounds of one timed call per arm, order reversed every round."
    )
    run.add_table(
        "Training throughput (pairs/s of the timed training calls)",
        [
            "step",
            "arm",
            "pairs/s (median)",
            "ratio to TRL (median)",
            "ratio range",
            "reference pass s",
            "optimizer steps per call",
            "load at start (median)",
        ],
        rows,
        note="Ratio: per round, the arm's pairs/s over TRL's pairs/s in the same round; >1 means faster than TRL. "
        "Reference pass (once, not in pairs/s): apo-ray's ReferenceModel.sequence_logprobs over chosen and "
        "rejected; TRL's DPOTrainer constructor (tokenization + precomputed reference log-probs).",
    )
    labels = [f"{step.upper()} {arm}" for step in STEPS for arm in ARMS]
    values = [results[f"{step}/{arm}"]["median_pairs_per_s"] for step in STEPS for arm in ARMS]
    ranges = [
        (min(results[f"{s}/{a}"]["train_pairs_per_s"]), max(results[f"{s}/{a}"]["train_pairs_per_s"]))
        for s in STEPS
        for a in ARMS
    ]
    run.add_bar_chart(
        "vs_trl_throughput.png",
        labels,
        values,
        ylabel="training pairs/s",
        errors=ranges,
        title="apo-ray vs TRL, tiny models on CPU (median, range)",
    )
    return {
        "settings": {k: str(v) if k == "out" else v for k, v in vars(args).items()},
        "pairs_per_call": pairs_per_call,
        "arms": results,
        "call_order": [{"arm": t.arm, "repeat": t.repeat, "wall": t.timing.to_dict()} for t in trials],
    }


if __name__ == "__main__":
    main()
