"""The learners' output layer on the response alone (apo_ray.modeling.ResponseWindow) against every position, on
SmolLM2-135M-Instruct with the CPU recipe's shapes.

One online iteration of the recipe reads 32 samples (8 HH prompts x 4) of up to 256 prompt tokens through the chat
template and 64 response tokens. Before this change every learner forward computed the [T, 49152] logits and their
float32 log-softmax at every position, prompt included; now the prompt is left-padded and `logits_to_keep` keeps the
response's columns. Both arms run the same samples in micro-batches of 8, interleaved, on this process's threads:

- `logprobs`: the no-grad pass the policy and the reference make over a round's samples;
- `train`: forward and backward of the samples' summed log-probs with gradient checkpointing, as a policy step's.

The float32 matmul ceiling is measured at start and end, and the arms' log-probs are compared.

    .venv/bin/python -m benchmarks.response_window [--quick] [--repeats 3]
"""

from __future__ import annotations

import json

import torch

from benchmarks.common import BenchmarkRun, base_parser, interleave, load_average, median, ratio_summary
from benchmarks.real_model_time import HH_DEV, smollm2_dir

MICRO_BATCH = 8


def recipe_samples(tokenizer, n: int):
    """`n` HH dev dialogues through the chat template (256 prompt tokens at most), each answered by its chosen
    response cut to 64 tokens."""
    from apo_ray.chat import AUTO, resolve_template
    from apo_ray.data import parse_hh_dialogue
    from apo_ray.modeling import text_samples

    pairs = [parse_hh_dialogue(json.loads(line)["chosen"]) for line in HH_DEV.read_text().splitlines()[:n]]
    template = resolve_template(AUTO, tokenizer)
    return text_samples(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], 256, 64, chat_template=template)


def full_forward(model, samples, pad_token_id) -> torch.Tensor:
    """The path before the change: right-padded rows, logits at every position."""
    from apo_ray.losses import token_logprobs
    from apo_ray.modeling import encode_samples

    batch = encode_samples(samples, pad_token_id)
    logps = token_logprobs(
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.input_ids
    )
    return logps * batch.response_mask[:, 1:]


def window_forward(model, samples, pad_token_id) -> torch.Tensor:
    from apo_ray.modeling import response_token_logprobs

    return response_token_logprobs(model, samples, pad_token_id)[0]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from apo_ray.flops import machine_threads, matmul_ceiling
    from apo_ray.modeling import load_causal_lm, load_tokenizer

    run = BenchmarkRun("response_window", "The output layer on the response alone (SmolLM2-135M, CPU)", args)
    torch.set_num_threads(machine_threads())
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    samples = recipe_samples(tokenizer, 8 if args.quick else 32)
    model = load_causal_lm(path, "float32")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad = tokenizer.pad_token_id
    prompt_tokens = sum(len(s.prompt_ids) for s in samples)
    response_tokens = sum(len(s.response_ids) for s in samples)
    ceiling_start = matmul_ceiling()
    paths = {"full": full_forward, "window": window_forward}
    chunks = [samples[i : i + MICRO_BATCH] for i in range(0, len(samples), MICRO_BATCH)]

    def logprobs(forward):
        model.eval()
        with torch.no_grad():
            return torch.cat([forward(model, chunk, pad).flatten() for chunk in chunks])

    def train(forward):
        model.train()
        for chunk in chunks:
            forward(model, chunk, pad).sum().backward()
        model.zero_grad(set_to_none=True)

    arms = {
        f"{phase} {name}": (lambda repeat, phase_fn=phase_fn, forward=forward: phase_fn(forward))
        for phase, phase_fn in (("logprobs", logprobs), ("train", train))
        for name, forward in paths.items()
    }
    logprobs(window_forward)  # warm-up: thread pool, allocator
    trials = interleave(arms, args.repeats)
    ceiling_end = matmul_ceiling()

    seconds = {arm: [t.timing.seconds for t in trials if t.arm == arm] for arm in arms}
    difference = (logprobs(full_forward) - logprobs(window_forward)).abs().max().item()
    rows, results = [], {}
    for phase in ("logprobs", "train"):
        ratio = ratio_summary(seconds[f"{phase} full"], seconds[f"{phase} window"])
        results[phase] = {"full_s": seconds[f"{phase} full"], "window_s": seconds[f"{phase} window"], "speedup": ratio}
        rows.append(
            [
                phase,
                median(seconds[f"{phase} full"]),
                median(seconds[f"{phase} window"]),
                ratio["median"],
                f"{ratio['min']:.2f}-{ratio['max']:.2f}",
            ]
        )
    loads = [t.timing.load_start for t in trials] + [t.timing.load_end for t in trials]
    run.add_table(
        f"{len(samples)} samples, micro-batches of {MICRO_BATCH}, {args.repeats} interleaved repeats",
        ["phase", "every position (s, median)", "response only (s, median)", "speed-up (median)", "range"],
        rows,
        note=(
            f"Prompt tokens {prompt_tokens}, response tokens {response_tokens} "
            f"({prompt_tokens / (prompt_tokens + response_tokens):.0%} of positions are prompt). "
            f"{torch.get_num_threads()} threads; float32 matmul ceiling {ceiling_start / 1e9:.0f} GFLOP/s at start, "
            f"{ceiling_end / 1e9:.0f} at end; load average {min(loads):.2f}-{max(loads):.2f} over the timed arms, "
            f"{load_average():.2f} at the end. The arms' log-probs differ by at most {difference:.2e} (float32)."
        ),
    )
    run.finish(
        {
            "arms": results,
            "samples": len(samples),
            "prompt_tokens": prompt_tokens,
            "response_tokens": response_tokens,
            "threads": torch.get_num_threads(),
            "ceiling_flops": [ceiling_start, ceiling_end],
            "max_logprob_difference": difference,
        }
    )


if __name__ == "__main__":
    main()
