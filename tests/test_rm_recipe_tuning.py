"""The RM recipe sweep (benchmarks/rm_recipe_tuning.py): its holdout split and when a finished run is reused."""

import argparse
import json

import pytest
import yaml

from apo_ray.stages.reward_model import load_rm_data
from benchmarks.rm_recipe_tuning import (
    DATA_DIR,
    candidate_config,
    candidate_record,
    candidate_tag,
    finished_summary,
    seeded_runs,
)


def sweep_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"data_dir": DATA_DIR, "train_pairs": 1212, "cpus": 2, "quick": False, **kw})


def finished_run(tmp_path, cfg, summary=None):
    """What run_stage leaves in a run directory, as it writes it."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"stage": cfg.STAGE, **cfg.model_dump()}, sort_keys=False))
    (tmp_path / "summary.json").write_text(json.dumps(summary or {"eval": {"rm/acc": 0.6}}))


def test_the_holdout_is_the_end_of_the_train_file_and_dev_is_never_read(tmp_path):
    cfg = candidate_config(sweep_args(), ["lr=5e-5"], tmp_path)
    assert cfg.lr == 5e-5 and cfg.eval.path == cfg.train.path == str(DATA_DIR / "train.jsonl")
    data = load_rm_data(cfg)
    assert (len(data.train), len(data.eval)) == (1212, 300)
    assert not {p.prompt + p.chosen for p in data.train} & {p.prompt + p.chosen for p in data.eval}


def test_a_finished_run_is_reused_only_for_the_same_computation(tmp_path):
    args = sweep_args()
    cfg = candidate_config(args, ["lr=5e-5"], tmp_path)
    assert finished_summary(cfg, tmp_path) is None
    finished_run(tmp_path, cfg)
    assert finished_summary(cfg, tmp_path) == {"eval": {"rm/acc": 0.6}}
    # Where and on how many CPUs it ran does not change what it computed ...
    placed = candidate_config(sweep_args(cpus=1), ["lr=5e-5", "ray.address=auto"], tmp_path / "elsewhere")
    assert finished_summary(placed, tmp_path) is not None
    # ... a recipe key does; dropout is flipped from whatever the recipe says so the test outlives a recipe change.
    assert finished_summary(candidate_config(args, ["lr=2e-5"], tmp_path), tmp_path) is None
    flipped = f"disable_dropout={str(not cfg.disable_dropout).lower()}"
    assert finished_summary(candidate_config(args, ["lr=5e-5", flipped], tmp_path), tmp_path) is None


def test_candidate_tags_name_the_overrides():
    assert candidate_tag(["lr=5e-5", "disable_dropout=true"]) == "lr=5e-5_disable_dropout=true"
    assert candidate_tag([]) == "recipe"


def test_seeds_run_every_candidate_once_per_seed():
    args = sweep_args(candidates=["lr=5e-5", ""], seeds=[0, 3])
    assert seeded_runs(args) == [
        ("lr=5e-5", ["lr=5e-5", "seed=0"]),
        ("lr=5e-5", ["lr=5e-5", "seed=3"]),
        ("", ["seed=0"]),
        ("", ["seed=3"]),
    ]
    assert seeded_runs(sweep_args(candidates=["lr=5e-5"], seeds=None)) == [("lr=5e-5", ["lr=5e-5"])]


def _runs(*correct_by_seed):
    """One run per seed, with these holdout outcomes (1: chosen ranked first) and the stage's accuracy of them."""
    return [
        {
            "seed": seed,
            "correct": [float(c) for c in correct],
            "summary": {"eval": {"rm/acc": sum(correct) / len(correct)}, "train": {}},
        }
        for seed, correct in enumerate(correct_by_seed)
    ]


def test_differences_are_paired_over_pairs_with_one_seed_and_over_seeds_with_more():
    reference = _runs([1, 0, 0, 1], [1, 1, 0, 0])
    candidate = _runs([1, 1, 0, 1], [1, 1, 1, 1])
    one = candidate_record(candidate[:1], reference[:1])
    # One seed: the mean of the per-pair differences (0, +1, 0, 0), its spread over the 4 pairs.
    assert one["difference_from_reference"]["mean"] == pytest.approx(0.25)
    assert one["difference_from_reference"]["n"] == 4 and one["holdout_accuracy"]["n"] == 4
    both = candidate_record(candidate, reference)
    # Two seeds: each seed's accuracy difference (+0.25, +0.5), a t-interval over those two.
    assert both["holdout_accuracy_by_seed"] == {0: 0.75, 1: 1.0}
    assert both["holdout_accuracy"]["mean"] == pytest.approx(0.875) and both["holdout_accuracy"]["n"] == 2
    diff = both["difference_from_reference"]
    assert diff["mean"] == pytest.approx(0.375) and diff["n"] == 2
    # t(0.975, 1 degree of freedom) = 12.706.
    assert diff["stderr"] == pytest.approx(0.125)
    assert diff["hi"] - diff["mean"] == pytest.approx(12.706 * 0.125, rel=1e-3)
    assert both["stage_accuracy_matches"]
