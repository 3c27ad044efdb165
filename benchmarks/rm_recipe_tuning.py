"""Choosing the `apo-ray rm` recipe for the HH MiniLM RM on a holdout of the training file, never on dev.

Each candidate is configs/stages/rm_hh_minilm.yaml with some `key=value` overrides, trained by the stage as
users run it (Ray Train, DeepSpeed ZeRO-2, 1 worker) on the first `--train-pairs` pairs of train.jsonl and
scored on the rest of that file (`train.limit` and `eval.skip`). The holdout is rescored here from each
candidate's exported model, pair by pair, so that every candidate is compared with the first one on the same
pairs: a paired difference of accuracy with a 95% t-interval over holdout pairs. That interval holds the
holdout's sampling noise only; a second training run of the same recipe moves dev accuracy by about 0.05
(benchmarks/results/ray_train_rm, 1 worker against 2), which the note beside the table says.

A candidate whose run directory holds a finished run of the same config (workers and Ray aside) is not run
again, so the sweep resumes and can be widened.

    .venv/bin/python -m benchmarks.rm_recipe_tuning [--quick] --candidates "lr=1e-4" "lr=5e-5" ...
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
    parser.add_argument("--train-pairs", type=int, default=1212,
                        help="pairs trained on; the rest of train.jsonl is the holdout")
    parser.add_argument("--candidates", nargs="+", default=["lr=1e-4", "lr=5e-5"],
                        help="one quoted string of space-separated overrides per candidate; the first is the "
                             "reference of the paired differences")
    parser.add_argument("--scratch", type=Path, help="run directories (default: the benchmark's scratch)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the one Ray Train worker")
    args = parser.parse_args()
    if args.quick:
        args.train_pairs = min(args.train_pairs, 24)
    if not (args.data_dir / "train.jsonl").is_file():
        parser.error(f"--data-dir: no train.jsonl in {args.data_dir}")
    return args


def candidate_tag(overrides: list[str]) -> str:
    """A run directory name: the overrides themselves, or 'recipe' for the config as it is."""
    return "_".join(overrides).replace("/", "-") or "recipe"


def candidate_config(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> RMStageConfig:
    train = args.data_dir / "train.jsonl"
    base = [f"base_model={minilm_dir()}", f"train.path={train}", f"train.limit={args.train_pairs}",
            f"eval.path={train}", f"eval.skip={args.train_pairs}", f"run_dir={run_dir}", "workers.num_workers=1",
            f"workers.num_cpus_per_worker={args.cpus}", "eval_every_epoch=true"]
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
    results: dict[str, dict[str, Any]] = {}
    for text in args.candidates:
        overrides = text.split()
        run_dir = scratch / candidate_tag(overrides)
        cfg = candidate_config(args, overrides, run_dir)
        summary = finished_summary(cfg, run_dir)
        if summary is None:
            print(f"[rm_recipe_tuning] {text or 'recipe'}: training in {run_dir}", flush=True)
            summary = run_stage(prepare_stage(cfg, resume=(run_dir / "config.yaml").is_file()))
        else:
            print(f"[rm_recipe_tuning] {text or 'recipe'}: finished run in {run_dir} reused", flush=True)
        correct = holdout_correct(cfg, Path(summary["model"]))
        results[text] = {"summary": summary, "correct": correct}
    ray.shutdown()
    run.finish(summarize(args, run, results))


def by_epoch(summary: dict) -> str:
    """The holdout accuracy after each epoch (the stage's eval_every_epoch), the epochs a recipe could stop at."""
    return " / ".join(f"{e['rm/acc']:.3f}" for e in summary["eval_by_epoch"])


def summarize(args: argparse.Namespace, run: BenchmarkRun, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    reference = args.candidates[0]
    rows, records = [], {}
    for text, result in results.items():
        ev, train = result["summary"]["eval"], result["summary"]["train"]
        correct = [float(c) for c in result["correct"]]
        accuracy = mean_ci(correct)
        diff = mean_ci([c - r for c, r in zip(correct, map(float, results[reference]["correct"]))])
        rows.append([text or "(recipe)", f"{accuracy['mean']:.3f} ({accuracy['stderr']:.3f})", ev["rm/ece"],
                     ev["rm/margin"], "-" if text == reference else
                     f"{diff['mean']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]", by_epoch(result["summary"]),
                     train["train/pairs_per_s"]])
        records[text] = {"holdout_accuracy": accuracy, "difference_from_reference": diff, "eval": ev,
                         "train": train, "stage_accuracy_matches": abs(ev["rm/acc"] - accuracy["mean"]) < 1e-9}
    best = max(results, key=lambda text: records[text]["holdout_accuracy"]["mean"])
    data = next(iter(results.values()))["summary"]["data"]
    run.add_text(
        f"Data: the first {data['train']['pairs']} pairs of `{args.data_dir / 'train.jsonl'}` train, its last "
        f"{data['eval']['pairs']} are the holdout; dev.jsonl is not read. Every candidate is "
        f"configs/stages/rm_hh_minilm.yaml with the overrides named (seed 0 unless named), on 1 Ray Train worker ("
        + ", ".join(f"'{text}' {r['summary']['workers']['num_cpus_per_worker']:g} CPU(s), "
                    f"{r['summary']['torch_threads_per_worker']} torch thread(s)" for text, r in results.items())
        + ")."
    )
    run.add_table("Holdout accuracy by candidate", ["overrides", "holdout acc (SE)", "ECE", "mean margin",
                                                     f"paired difference from '{reference}' [95% CI]",
                                                     "holdout acc after each epoch", "train pairs/s"], rows,
                  note=f"Highest holdout accuracy: '{best}'. The interval is over holdout pairs (one training run "
                       "per candidate), so it leaves out the spread between training runs of one recipe, about 0.05 "
                       "in dev accuracy. pairs/s depends on what else ran (see the load above).")
    accuracies = [records[text]["holdout_accuracy"] for text in results]
    run.add_bar_chart("rm_recipe_tuning_accuracy.png", [t or "(recipe)" for t in results],
                      [a["mean"] for a in accuracies], ylabel="holdout accuracy (bars: 1 SE)",
                      title="HH MiniLM RM: holdout accuracy by recipe",
                      errors=[(a["mean"] - a["stderr"], a["mean"] + a["stderr"]) for a in accuracies])
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "data": data, "candidates": records, "best": best}


if __name__ == "__main__":
    main()
