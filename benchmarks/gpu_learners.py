"""The policy learner on one GPU without Ray or vLLM: a policy step (RJS's SFT step) and a gathered save
(`PolicyLearner.save`, ZeRO-3's shards gathered into one HF directory) in this machine's processes, with the torch
engine and with DeepSpeed ZeRO-2 and ZeRO-3, on a Qwen2.5-0.5B-shaped model built here from a config with random
weights (no hub; throughput and memory depend on the shape, not on what the weights learned).

    python -m benchmarks.gpu_learners                 # needs torch with CUDA (NCCL); Ray and vLLM are not needed
    python -m benchmarks.gpu_learners --cpu-check     # the same code on CPU, tiny shape: checks that it runs

DeepSpeed runs in bfloat16 (fp32 master weights), the torch engine in float32: apo-ray refuses bfloat16 without
master weights (docs/running.md, "Tokens and dtypes"). Each arm runs in a fresh process (its own DeepSpeed process group
and a clean peak-memory count; the CPU check runs them in one) and prints one line: tokens/s of the timed steps
(prompt and response tokens through forward and backward), the save's seconds, peak GPU memory, and whether
anything imported Ray or vLLM (the arm fails if so). Results go to results/gpu_learners/ (--cpu-check: its
git-ignored tmp/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BenchmarkRun, base_parser

# (learner.backend, learner.zero_stage, model.dtype); "auto" is bfloat16 on a GPU, float32 on CPU.
ARMS = {"torch": ("torch", 0, "float32"), "zero2": ("deepspeed", 2, "auto"), "zero3": ("deepspeed", 3, "auto")}

SHAPES = {
    # Qwen2.5-0.5B's config: 494M parameters, the embedding tied to the output layer.
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # The CPU check's shape: its 2048 x 64 embedding is over ZeRO-3's persistence threshold, so stage 3 partitions it.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}

# Batch and lengths per shape: (samples per step, prompt tokens, response tokens, timed steps).
WORKLOADS = {"qwen2.5-0.5b": (8, 256, 256, 5), "tiny": (4, 8, 8, 2)}


def build_model(shape: str, out: Path) -> Path:
    """A random Qwen2 of `shape` with the builtin word-level tokenizer (the learner only reads its pad id)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from apo_ray.builtin.models import make_tokenizer

    tokenizer = make_tokenizer()
    config = Qwen2Config(
        **SHAPES[shape],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    # bfloat16 on disk halves the 0.5B model's 2 GB; each arm loads it in its own dtype.
    model.to(torch.bfloat16 if shape != "tiny" else torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_arm(arm: str, model_dir: Path, shape: str, save_dir: Path) -> dict:
    """One arm, in this process: the learner built as a plain class, a warm-up step, timed steps, a save."""
    import torch
    from transformers import AutoModelForCausalLM

    from apo_ray.actors.policy import PolicyLearner
    from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
    from apo_ray.game import TokenSample

    backend, stage, dtype = ARMS[arm]
    batch, prompt_len, response_len, steps = WORKLOADS[shape]
    vocab = SHAPES[shape]["vocab_size"]
    learner = PolicyLearner(
        str(model_dir),
        model=ModelConfig(dtype=dtype),
        policy=PolicyConfig(batch_size=batch, lr=1e-5),
        learner=LearnerConfig(backend=backend, zero_stage=stage),
    )
    generator = torch.Generator().manual_seed(0)
    # Ids from 16 up: clear of the tokenizer's special tokens.
    samples = [
        TokenSample(
            tuple(torch.randint(16, vocab, (prompt_len,), generator=generator).tolist()),
            tuple(torch.randint(16, vocab, (response_len,), generator=generator).tolist()),
        )
        for _ in range(batch)
    ]
    on_gpu = torch.cuda.is_available()
    learner.sft_step(samples, epochs=1, seed=0)  # warm-up: allocator, kernels, DeepSpeed's buffers
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # One minibatch per epoch: `steps` optimizer steps on the whole batch.
    stats = learner.sft_step(samples, epochs=steps, seed=1)
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    learner.save(str(save_dir))
    save_s = time.perf_counter() - started
    trained = learner.engine.full_state_dict()
    saved = AutoModelForCausalLM.from_pretrained(save_dir, dtype=next(iter(trained.values())).dtype).state_dict()
    loaded = sys.modules
    return {
        "arm": arm,
        "backend": backend,
        "zero_stage": stage,
        "dtype": str(next(learner.model.parameters()).dtype),
        "device": "cuda" if on_gpu else "cpu",
        "parameters": sum(t.numel() for t in trained.values()),
        # ZeRO-3 keeps only this rank's shard of a partitioned parameter between steps.
        "partitioned": any(p.data.numel() == 0 for p in learner.model.parameters()),
        "tokens_per_s": steps * batch * (prompt_len + response_len) / stats["timing/policy_step"],
        "step_s": stats["timing/policy_step"] / steps,
        "save_s": save_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "loss": stats["policy/loss"],
        "grad_norm": stats.get("policy/grad_norm"),
        "saved_equals_trained": all(torch.equal(saved[name].cpu(), trained[name]) for name in trained),
        "imported_ray": any(name == "ray" or name.startswith("ray.") for name in loaded),
        "imported_vllm": any(name == "vllm" or name.startswith("vllm.") for name in loaded),
    }


def arms_main(argv: list[str]) -> int:
    """`--arms-in-process ARMS MODEL_DIR SHAPE SCRATCH OUT`: the comma-separated arms one after the other in
    this process, their results as a JSON list in OUT."""
    arms, model_dir, shape, scratch, out = argv
    results = [run_arm(arm, Path(model_dir), shape, Path(scratch) / f"saved_{arm}") for arm in arms.split(",")]
    Path(out).write_text(json.dumps(results))
    ok = all(r["saved_equals_trained"] and not (r["imported_ray"] or r["imported_vllm"]) for r in results)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-check",
        action="store_true",
        help="run every arm on CPU with the tiny shape (implies --quick): checks the script, times nothing",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: qwen2.5-0.5b, tiny with --cpu-check")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_check:
        print(
            "error: no CUDA device; this benchmark is for a GPU machine (--cpu-check runs it on CPU)", file=sys.stderr
        )
        return 2
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: --arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    args.quick = args.quick or args.cpu_check
    shape = args.shape or ("tiny" if args.cpu_check else "qwen2.5-0.5b")
    run = BenchmarkRun("gpu_learners", "Learners on one GPU, in-process without Ray: torch vs DeepSpeed ZeRO-2/3", args)
    results, failed = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_learners-", dir=run.scratch) as scratch:
        scratch = Path(scratch)
        model_dir = build_model(shape, scratch / "model")
        # On a GPU one process per arm, for a clean peak-memory count; the CPU check keeps off any GPU the machine
        # has and runs the arms in one process (each process spends most of its time importing).
        batches = [",".join(arms)] if args.cpu_check else arms
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.cpu_check else None
        for index, batch in enumerate(batches):
            out = scratch / f"arms_{index}.json"
            code = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.gpu_learners",
                    "--arms-in-process",
                    batch,
                    str(model_dir),
                    shape,
                    str(scratch),
                    str(out),
                ],
                env=env,
            ).returncode
            done = json.loads(out.read_text()) if out.is_file() else [{"arm": arm} for arm in batch.split(",")]
            for result in done:
                result["exit_code"] = code
                print(
                    f"[gpu_learners] {result['arm']}: "
                    + ", ".join(f"{k} {v}" for k, v in result.items() if k != "arm"),
                    flush=True,
                )
            results += done
            if code:
                failed += batch.split(",")
    batch, prompt_len, response_len, steps = WORKLOADS[shape]
    run.add_table(
        f"{shape}: {steps} steps of {batch} samples x ({prompt_len} prompt + {response_len} response) tokens",
        [
            "arm",
            "dtype",
            "device",
            "tokens/s",
            "s/step",
            "save s",
            "peak GiB",
            "ZeRO-3 partitioned",
            "Ray/vLLM imported",
        ],
        [
            [
                r["arm"],
                r.get("dtype"),
                r.get("device"),
                r.get("tokens_per_s"),
                r.get("step_s"),
                r.get("save_s"),
                r.get("peak_gib"),
                r.get("partitioned"),
                f"{r.get('imported_ray')}/{r.get('imported_vllm')}",
            ]
            for r in results
        ],
        note="tokens/s: prompt and response tokens through forward and backward per second of the timed steps "
        "(after one warm-up step); peak GiB: torch.cuda.max_memory_allocated over the timed steps and the save.",
    )
    run.finish(
        {
            "shape": shape,
            "workload": dict(zip(("batch", "prompt", "response", "steps"), WORKLOADS[shape])),
            "arms": results,
        }
    )
    if failed:
        print(f"error: arm(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(arms_main(sys.argv[2:]) if sys.argv[1:2] == ["--arms-in-process"] else main())
