"""Choosing the `apo-ray rm` recipe for the HH MiniLM RM on a holdout of the training file, never on dev.

Each candidate is configs/stages/rm_hh_minilm.yaml with some `key=value` overrides, trained by the stage as
users run it (Ray Train, DeepSpeed ZeRO-2, 1 worker) on the first `--train-pairs` pairs of train.jsonl and
scored on the rest of that file (`train.limit` and `eval.skip`). The holdout is rescored here from each
candidate's exported model, pair by pair, so that every candidate is compared with the first one on the same
pairs. With one training seed the paired difference of accuracy gets a 95% t-interval over holdout pairs,
which holds the holdout's sampling noise only: a second training run of the same recipe moves accuracy by a
few points. With `--seeds`, every candidate trains once per seed, each seed's difference is taken on the same
pairs and seed, and the interval is over seeds: it holds the spread between training runs as well.

A candidate whose run directory holds a finished run of the same config (workers and Ray aside) is not run
again, so the sweep resumes and can be widened.

    .venv/bin/python -m benchmarks.rm_recipe_tuning [--quick] [--seeds 0 1 2] --candidates "lr=1e-4" "lr=5e-5" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from apo_ray.config import RMStageConfig, load_stage_config
from apo_ray.stages.runner import SUMMARY_FILE, prepare_stage, run_stage
from benchmarks.common import BenchmarkRun, base_parser, mean_ci, start_local_ray
from benchmarks.ray_train_rm import CONFIG, DATA_DIR
from benchmarks.tiny_models import minilm_dir

# Keys that change where and on how many processes a run goes, not what it computes.
PLACEMENT_KEYS = ("run_dir", "workers", "ray")


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="directory with train.jsonl")
    parser.add_argument(
        "--train-pairs", type=int, default=1212, help="pairs trained on; the rest of train.jsonl is the holdout"
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=["lr=1e-4", "lr=5e-5"],
        help="one quoted string of space-separated overrides per candidate; the first is the "
        "reference of the paired differences",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="training seeds: every candidate trains once on each (seed=N is added to its "
        "overrides) and differences get a t-interval over seeds; default the config's seed",
    )
    parser.add_argument("--scratch", type=Path, help="run directories (default: the benchmark's scratch)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the one Ray Train worker")
    args = parser.parse_args()
    if args.quick:
        args.train_pairs = min(args.train_pairs, 24)
    if not (args.data_dir / "train.jsonl").is_file():
        parser.error(f"--data-dir: no train.jsonl in {args.data_dir}")
    if args.seeds and any(o.startswith("seed=") for text in args.candidates for o in text.split()):
        parser.error("--seeds: a candidate names its own seed; give seeds one way")
    return args


def seeded_runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(candidate, its overrides) for each training run: one per candidate and --seeds seed."""
    if not args.seeds:
        return [(text, text.split()) for text in args.candidates]
    return [(text, [*text.split(), f"seed={seed}"]) for text in args.candidates for seed in args.seeds]


def candidate_tag(overrides: list[str]) -> str:
    """A run directory name: the overrides themselves, or 'recipe' for the config as it is."""
    return "_".join(overrides).replace("/", "-") or "recipe"


def candidate_config(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> RMStageConfig:
    train = args.data_dir / "train.jsonl"
    base = [
        f"base_model={minilm_dir()}",
        f"train.path={train}",
        f"train.limit={args.train_pairs}",
        f"eval.path={train}",
        f"eval.skip={args.train_pairs}",
        f"run_dir={run_dir}",
        "workers.num_workers=1",
        f"workers.num_cpus_per_worker={args.cpus}",
        "eval_every_epoch=true",
    ]
    if args.quick:
        base += ["eval.limit=16", "max_length=64", "batch_size=8", "epochs=1", "checkpoint_every=2"]
    return load_stage_config(RMStageConfig, CONFIG, base + overrides)


def _computed(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k not in PLACEMENT_KEYS + ("stage",)}


def finished_summary(cfg: RMStageConfig, run_dir: Path) -> dict | None:
    """The summary of a finished run of this config in run_dir, if there is one."""
    summary, saved = run_dir / SUMMARY_FILE, run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return None
    # The stage writes config.yaml with yaml.safe_dump(cfg.model_dump()); the same round trip compares like to like.
    if _computed(yaml.safe_load(saved.read_text())) != _computed(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))):
        return None
    return json.loads(summary.read_text())


def holdout_correct(cfg: RMStageConfig, model_dir: Path) -> list[bool]:
    """Whether the exported model ranks each holdout pair's chosen side first, in file order."""
    from apo_ray.stages.reward_model import RewardModelTask, load_rm_data

    task = RewardModelTask(cfg.model_copy(update={"base_model": str(model_dir)}))
    model = task.load_model().eval()
    return [chosen > rejected for chosen, rejected in task.eval_records(model, load_rm_data(cfg).eval)]


def main() -> None:
    args = parse_args()
    run = BenchmarkRun("rm_recipe_tuning", "HH MiniLM RM recipe chosen on a train-file holdout", args)
    scratch = args.scratch or run.scratch
    import ray

    start_local_ray(args.cpus, log_to_driver=True)
    results: dict[str, list[dict[str, Any]]] = {text: [] for text in args.candidates}
    for text, overrides in seeded_runs(args):
        run_dir = scratch / candidate_tag(overrides)
        cfg = candidate_config(args, overrides, run_dir)
        label = " ".join(overrides) or "recipe"
        summary = finished_summary(cfg, run_dir)
        if summary is None:
            print(f"[rm_recipe_tuning] {label}: training in {run_dir}", flush=True)
            summary = run_stage(prepare_stage(cfg, resume=(run_dir / "config.yaml").is_file()))
        else:
            print(f"[rm_recipe_tuning] {label}: finished run in {run_dir} reused", flush=True)
        correct = [float(c) for c in holdout_correct(cfg, Path(summary["model"]))]
        results[text].append({"seed": cfg.seed, "summary": summary, "correct": correct})
    ray.shutdown()
    run.finish(summarize(args, run, results))


def by_epoch(runs: list[dict[str, Any]]) -> str:
    """The holdout accuracy after each epoch (the stage's eval_every_epoch), the epochs a recipe could stop at;
    the mean over seeds."""
    epochs = zip(*(run["summary"]["eval_by_epoch"] for run in runs))
    return " / ".join(f"{sum(e['rm/acc'] for e in epoch) / len(runs):.3f}" for epoch in epochs)


def _mean(runs: list[dict[str, Any]], read) -> float:
    return sum(read(run) for run in runs) / len(runs)


def candidate_record(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Holdout accuracy and its paired difference from the reference: over pairs with one seed, over seeds with
    more (each seed's difference on the same pairs, against the reference's run of that seed)."""
    per_seed = [sum(run["correct"]) / len(run["correct"]) for run in runs]
    differences = [[c - r for c, r in zip(run["correct"], ref["correct"])] for run, ref in zip(runs, reference)]
    if len(runs) == 1:
        accuracy, difference = mean_ci(runs[0]["correct"]), mean_ci(differences[0])
    else:
        accuracy, difference = mean_ci(per_seed), mean_ci([sum(d) / len(d) for d in differences])
    return {
        "holdout_accuracy": accuracy,
        "difference_from_reference": difference,
        "holdout_accuracy_by_seed": dict(zip((run["seed"] for run in runs), per_seed)),
        "eval": [run["summary"]["eval"] for run in runs],
        "train": [run["summary"]["train"] for run in runs],
        "stage_accuracy_matches": all(
            abs(run["summary"]["eval"]["rm/acc"] - acc) < 1e-9 for run, acc in zip(runs, per_seed)
        ),
    }


def summarize(args: argparse.Namespace, run: BenchmarkRun, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    reference = args.candidates[0]
    seeds = [r["seed"] for r in results[reference]]
    over = "pairs (one training run per candidate)" if len(seeds) == 1 else f"the {len(seeds)} training seeds"
    rows, records = [], {}
    for text, runs in results.items():
        record = records[text] = candidate_record(runs, results[reference])
        accuracy, diff = record["holdout_accuracy"], record["difference_from_reference"]
        rows.append(
            [
                text or "(recipe)",
                f"{accuracy['mean']:.3f} ({accuracy['stderr']:.3f})",
                " / ".join(f"{a:.3f}" for a in record["holdout_accuracy_by_seed"].values()),
                _mean(runs, lambda r: r["summary"]["eval"]["rm/ece"]),
                _mean(runs, lambda r: r["summary"]["eval"]["rm/margin"]),
                "-" if text == reference else f"{diff['mean']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]",
                by_epoch(runs),
                _mean(runs, lambda r: r["summary"]["train"]["train/pairs_per_s"]),
            ]
        )
    best = max(results, key=lambda text: records[text]["holdout_accuracy"]["mean"])
    data = results[reference][0]["summary"]["data"]
    run.add_text(
        f"Data: the first {data['train']['pairs']} pairs of `{args.data_dir / 'train.jsonl'}` train, its last "
        f"{data['eval']['pairs']} are the holdout; dev.jsonl is not read. Every candidate is "
        f"configs/stages/rm_hh_minilm.yaml with the overrides named, trained with seed(s) "
        f"{', '.join(map(str, seeds))} on 1 Ray Train worker ("
        + ", ".join(
            f"'{text}' {runs[0]['summary']['workers']['num_cpus_per_worker']:g} CPU(s), "
            f"{runs[0]['summary']['torch_threads_per_worker']} torch thread(s)"
            for text, runs in results.items()
        )
        + ")."
    )
    run.add_table(
        "Holdout accuracy by candidate",
        [
            "overrides",
            "holdout acc (SE)",
            "by seed",
            "ECE",
            "mean margin",
            f"paired difference from '{reference}' [95% CI]",
            "holdout acc after each epoch",
            "train pairs/s",
        ],
        rows,
        note=f"Highest holdout accuracy: '{best}'. The standard error and the interval are over {over}"
        + (", so they leave out the spread between training runs of one recipe" if len(seeds) == 1 else "")
        + ". ECE, margin, the epochs and pairs/s are means over seeds; pairs/s depends "
        "on what else ran (see the load above).",
    )
    accuracies = [records[text]["holdout_accuracy"] for text in results]
    run.add_bar_chart(
        "rm_recipe_tuning_accuracy.png",
        [t or "(recipe)" for t in results],
        [a["mean"] for a in accuracies],
        ylabel="holdout accuracy (bars: 1 SE)",
        title="HH MiniLM RM: holdout accuracy by recipe",
        errors=[(a["mean"] - a["stderr"], a["mean"] + a["stderr"]) for a in accuracies],
    )
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": data,
        "candidates": records,
        "best": best,
    }


if __name__ == "__main__":
    main()
