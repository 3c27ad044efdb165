"""Peak resident memory of the policy and its reference, full fine-tuning against LoRA, on SmolLM2-135M-Instruct
with the CPU recipe's learner (configs/hh_smollm2_apo_rjs_cpu.yaml: DeepSpeed ZeRO-2, one rank, float32, gradient
checkpointing).

Each arm runs in a fresh spawned process and reports that process's peak RSS (ru_maxrss) after: building the
learners (full: a PolicyLearner and a ReferenceModel; LoRA: one PolicyLearner, its reference the base weights with
the adapter off), one SFT step on a recipe minibatch (16 rows of 256 prompt and 64 response tokens, random ids),
and the reference's log-probs of those rows. Memory only: no timings.

    .venv/bin/python -m benchmarks.lora_memory [--quick] [--rank 16]
"""

from __future__ import annotations

import resource

from benchmarks.common import BenchmarkRun, IsolatedObject, base_parser
from benchmarks.real_model_time import smollm2_dir

ROWS, PROMPT_TOKENS, RESPONSE_TOKENS = 16, 256, 64


class Arm:
    """One arm's learners in its own process: `lora_rank` None is full fine-tuning beside a reference actor's
    model."""

    def __init__(self, path: str, lora_rank: int | None, rows: int):
        import torch

        from apo_ray.actors.policy import PolicyLearner
        from apo_ray.actors.reference import ReferenceModel
        from apo_ray.config import LearnerConfig, LoraConfig, ModelConfig, PolicyConfig
        from apo_ray.game import TokenSample

        lora = LoraConfig(enabled=lora_rank is not None, rank=lora_rank or 16)
        model = ModelConfig(max_prompt_tokens=PROMPT_TOKENS, max_response_tokens=RESPONSE_TOKENS)
        learner = LearnerConfig(backend="deepspeed", zero_stage=2, gradient_checkpointing=True, lora=lora)
        self.policy = PolicyLearner(path, model=model, policy=PolicyConfig(lr=1e-5, batch_size=rows), learner=learner)
        self.reference = None if lora.enabled else ReferenceModel(path, model=model)
        vocab = self.policy.model.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, PROMPT_TOKENS + RESPONSE_TOKENS), generator=generator).tolist()
        self.samples = [TokenSample(tuple(row[:PROMPT_TOKENS]), tuple(row[PROMPT_TOKENS:])) for row in ids]

    def measure(self) -> dict[str, float]:
        built = peak_rss_mib()
        self.policy.sft_step(self.samples, epochs=1, seed=0)
        stepped = peak_rss_mib()
        if self.reference is None:
            self.policy.reference_sequence_logprobs(self.samples)
        else:
            self.reference.sequence_logprobs(self.samples)
        trainable = sum(p.numel() for p in self.policy.model.parameters() if p.requires_grad)
        return {
            "peak_after_build_mib": built,
            "peak_after_step_mib": stepped,
            "peak_mib": peak_rss_mib(),
            "trainable_params": float(trainable),
        }


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="the LoRA arm's rank")
    args = parser.parse_args()
    run = BenchmarkRun("lora_memory", "LoRA: peak memory of the policy and its reference (SmolLM2-135M, CPU)", args)
    path, rows = smollm2_dir(), 4 if args.quick else ROWS
    results = {}
    for arm, rank in (("full", None), ("lora", args.rank)):
        process = IsolatedObject(Arm, path, rank, rows)
        try:
            results[arm] = process.call("measure")
        finally:
            process.close()
        print(f"[lora_memory] {arm}: {results[arm]}", flush=True)
    table = [
        [arm, f"{r['trainable_params']:,.0f}", r["peak_after_build_mib"], r["peak_after_step_mib"], r["peak_mib"]]
        for arm, r in results.items()
    ]
    run.add_table(
        "Peak RSS (MiB) of one process holding the policy learner and its reference",
        ["arm", "trainable weights", "after building", "after one SFT step", "after the reference's pass"],
        table,
        note=(
            f"{rows} rows of {PROMPT_TOKENS} + {RESPONSE_TOKENS} tokens; LoRA rank {args.rank} on "
            "every linear layer; full: a separate frozen reference model in the same process."
        ),
        digits=4,
    )
    run.finish({**results, "rows": rows, "lora_rank": args.rank})


if __name__ == "__main__":
    main()
