"""Answers to the same held-out HH prompts before and after the game: SmolLM2-135M-Instruct as it ships, then each
given run's last round checkpoint, greedy, through the checkpoint's own chat template (plain transformers, as a
user would load it). Each answer is also scored by the evaluation RM the game never trained.

    .venv/bin/python -m benchmarks.real_model_answers RUN_DIR [RUN_DIR ...] [--labels ...] [--prompts 4] --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, base_parser

MAX_NEW_TOKENS = 64


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="game run directories")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the directory names)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts answered")
    args = parser.parse_args()
    args.labels = args.labels or [run.name for run in args.runs]
    if len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    return args


def held_out_prompts(run_dir: Path, n: int) -> list[str]:
    """The first `n` held-out prompts of the run, as its evaluation draws them (apo_ray.held_out_evaluation)."""
    import yaml

    from apo_ray.config import config_from_dict
    from apo_ray.data import build_game_data

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = build_game_data(cfg.data, cfg.seed)
    return list(dict.fromkeys(p.prompt for p in data.eval_pairs))[:n]


def greedy_answers(model_dir: str, prompts: list[str], max_prompt_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    from apo_ray.chat import ChatFormat
    from apo_ray.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    chat = ChatFormat.for_setting(tokenizer, "auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([chat.prompt_ids(prompt, max_prompt_tokens)[0]])
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=sorted(chat.stop_ids() | {tokenizer.eos_token_id}),
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def last_policy(run_dir: Path) -> Path:
    rounds = sorted((run_dir / "checkpoints").glob("round_*/policy"))
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/round_*/policy")
    return rounds[-1]


def main() -> None:
    import yaml

    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig, config_from_dict
    from apo_ray.model_sources import loadable_path

    args = parse_args()
    cfg = config_from_dict(yaml.safe_load((args.runs[0] / "config.yaml").read_text()))
    prompts = held_out_prompts(args.runs[0], args.prompts)
    policies = {"SmolLM2-135M-Instruct (start)": loadable_path(cfg.model.policy_path, "model.policy_path")}
    policies.update(
        {
            f"{label} ({last_policy(run).parent.name})": str(last_policy(run))
            for label, run in zip(args.labels, args.runs)
        }
    )
    answers = {name: greedy_answers(path, prompts, cfg.model.max_prompt_tokens) for name, path in policies.items()}
    judge = RewardLearner(
        cfg.model.eval_reward,
        reward=RewardConfig(max_length=cfg.reward.max_length),
        learner=LearnerConfig(backend="torch"),
        dtype="float32",
        trainable=False,
    )
    scores = {name: judge.score(prompts, texts) for name, texts in answers.items()}
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / "real_model_answers")
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.json").write_text(
        json.dumps({"prompts": prompts, "answers": answers, "eval_rm_scores": scores}, indent=2)
    )
    lines = [
        "# Greedy answers to held-out HH prompts, before and after the game",
        "",
        f"At most {MAX_NEW_TOKENS} new tokens; the score is the evaluation RM's ({cfg.model.eval_reward}), "
        "which the game never trained. One greedy answer per prompt: an illustration, not a measurement.",
        "",
    ]
    for i, prompt in enumerate(prompts):
        turn = prompt.rsplit("\n\nHuman:", 1)[-1].removesuffix("\n\nAssistant:").strip()
        lines += [f"## Prompt {i + 1}", "", f"> Human: {turn}", ""]
        lines += [f"- **{name}** ({scores[name][i]:+.2f}): {answers[name][i]}" for name in policies]
        lines.append("")
    (out / "answers.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
