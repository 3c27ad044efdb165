"""The quality benchmark's statistics and seed sets (benchmarks/quality.py), against hand computations."""

import json
import math

import pytest

from benchmarks.quality import (
    ALL_ARMS,
    RunRecord,
    _final,
    arm_config,
    arm_spread,
    config_digest,
    paired_difference,
    parse_args,
    recipe_tag,
    t_interval,
    verdict,
)

T_975_2 = 4.302652729911275  # the 97.5% quantile of Student's t with 2 degrees of freedom


def record(seed: int, *golds: float, error: str | None = None) -> RunRecord:
    return RunRecord("arm", seed, rounds=[{"round": r, "eval/gold_score": g} for r, g in enumerate(golds)], error=error)


def test_t_interval_by_hand():
    # 1, 2, 3: mean 2, SD 1, SE 1 / sqrt(3)
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval["mean"] == 2.0 and interval["std"] == pytest.approx(1.0)
    assert interval["low"] == pytest.approx(2.0 - T_975_2 / math.sqrt(3))
    assert interval["high"] == pytest.approx(2.0 + T_975_2 / math.sqrt(3))
    assert math.isnan(t_interval([1.0])["low"])


def test_paired_difference_pairs_by_seed_and_skips_failed_runs():
    apo = [record(0, -0.5, 0.3), record(1, -0.4, 0.2), record(2, -0.6, 0.4), record(3, 0.0, error="boom")]
    fixed = [record(2, -0.6, 0.1), record(0, -0.5, 0.0), record(1, -0.4, 0.1), record(3, 0.0, 0.9)]
    diff = paired_difference(apo, fixed, "eval/gold_score", _final)
    assert diff["per_seed"] == pytest.approx({0: 0.3, 1: 0.1, 2: 0.3})
    assert diff["n"] == 3 and diff["better_seeds"] == 3
    # mean 0.7 / 3, SD sqrt(((0.3 - m)^2 * 2 + (0.1 - m)^2) / 2)
    mean = 0.7 / 3
    sd = math.sqrt(((0.3 - mean) ** 2 * 2 + (0.1 - mean) ** 2) / 2)
    assert diff["mean"] == pytest.approx(mean) and diff["std"] == pytest.approx(sd)
    assert diff["low"] == pytest.approx(mean - T_975_2 * sd / math.sqrt(3))
    assert verdict(diff) == "not better (interval covers 0)"  # 0.233 - 0.287 < 0


def test_verdicts_follow_the_interval():
    assert verdict({"n": 3, "stderr": 0.1, "low": 0.01, "high": 0.5}) == "better"
    assert verdict({"n": 3, "stderr": 0.1, "low": -0.5, "high": -0.01}) == "worse"
    assert verdict({"n": 1, "stderr": math.nan, "low": math.nan, "high": math.nan}) == "one seed only"
    assert verdict(None) == "not measured"


def test_arm_spread_names_the_worst_seed():
    stats = arm_spread([record(100, 0.0, 0.4), record(101, 0.0, -0.2), record(102, 0.0, 0.1)])
    assert stats["worst_seed"] == 101 and stats["worst"] == pytest.approx(-0.2)
    assert stats["mean"] == pytest.approx(0.1) and stats["std"] == pytest.approx(0.3)


def test_seed_sets_are_explicit_and_kept_apart():
    assert parse_args(["--seed-set", "reporting"]).seeds == list(range(100, 120))
    assert parse_args(["--seed-set", "tuning", "--seeds", "3", "4"]).seeds == [3, 4]
    with pytest.raises(SystemExit):
        parse_args(["--seed-set", "tuning", "--seeds", "100"])
    with pytest.raises(SystemExit):
        parse_args([])
    quick = parse_args(["--seed-set", "tuning", "--quick"])
    assert quick.seeds == [0, 1] and quick.rounds == 1 and quick.arms == ["rjs", "apo-rjs"]


def test_recipes_get_their_own_tag():
    plain = parse_args(["--seed-set", "tuning"])
    coef = parse_args(["--seed-set", "tuning", "--set", "reward.apo_coef=0.5", "reward.epochs_per_round=3"])
    same = parse_args(["--seed-set", "tuning", "--set", "reward.epochs_per_round=3", "reward.apo_coef=0.5"])
    assert recipe_tag(plain) == "default"
    assert recipe_tag(coef) == recipe_tag(same) != recipe_tag(parse_args(["--seed-set", "tuning", "--set", "seed=1"]))


def test_fixed_rm_runs_are_shared_by_recipes_that_change_only_apo_keys(tmp_path):
    by_name = {arm.name: arm for arm in ALL_ARMS}

    def digest(arm: str, *recipe: str) -> str:
        args = parse_args(["--seed-set", "tuning", *(["--set", *recipe] if recipe else [])])
        return config_digest(arm_config(by_name[arm], 0, tmp_path / "x", args))

    # apo=false ignores reward.apo_coef, so the fixed-RM arm's run is the same under both recipes ...
    assert digest("RJS") == digest("RJS", "reward.apo_coef=0.5")
    # ... and the APO arm's is not; nor is the fixed arm's when the recipe changes a key it reads
    assert digest("APO-RJS") != digest("APO-RJS", "reward.apo_coef=0.5")
    assert digest("RJS") != digest("RJS", "policy.lr=5e-4")
    assert digest("RJS") == config_digest(
        arm_config(by_name["RJS"], 0, tmp_path / "elsewhere", parse_args(["--seed-set", "tuning"]))
    )


def test_a_finished_run_is_found_under_an_older_digest_and_only_for_its_own_config(tmp_path):
    import yaml

    from benchmarks.quality import finished_run

    arm = {a.name: a for a in ALL_ARMS}["APO-RJS"]
    args = parse_args(["--seed-set", "tuning"])
    old = tmp_path / "apo-rjs-00000000-s3"  # named when the config had fewer keys
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump(arm_config(arm, 3, old, args).to_dict()))
    (old / "summary.json").write_text("{}")
    assert finished_run(arm, 3, tmp_path, args) == old
    assert finished_run(arm, 4, tmp_path, args) is None
    assert finished_run(arm, 3, tmp_path, parse_args(["--seed-set", "tuning", "--set", "reward.apo_coef=0.5"])) is None


def test_the_ledger_keeps_a_finished_run_for_its_own_config_only(tmp_path):
    from benchmarks.quality import add_to_ledger, ledger_record

    arm = {a.name: a for a in ALL_ARMS}["APO-RJS"]
    args = parse_args(["--seed-set", "tuning"])
    ledger = tmp_path / "runs.jsonl"
    rounds = [{"round": 0, "eval/gold_score": 0.4}, {"round": 1, "eval/gold_score": 0.7}]
    add_to_ledger(arm, RunRecord("APO-RJS", 3, rounds, wall_s=60.0), args, ledger)
    add_to_ledger(arm, RunRecord("APO-RJS", 3, rounds, wall_s=61.0), args, ledger)  # already there: not twice
    add_to_ledger(arm, RunRecord("APO-RJS", 4, error="boom"), args, ledger)  # a failed run is not kept
    assert len(ledger.read_text().splitlines()) == 1

    kept = ledger_record(arm, 3, args, ledger)
    assert kept.rounds == rounds and kept.reused and kept.arm == "APO-RJS"
    assert ledger_record(arm, 4, args, ledger) is None
    assert ledger_record(arm, 3, parse_args(["--seed-set", "tuning", "--set", "reward.apo_coef=0.5"]), ledger) is None
    assert ledger_record({a.name: a for a in ALL_ARMS}["RJS"], 3, args, ledger) is None
    assert ledger_record(arm, 3, parse_args(["--seed-set", "tuning", "--quick"]), ledger) is None

    # written when the config had fewer keys: a key at its default is no difference
    entry = json.loads(ledger.read_text())
    del entry["settings"]["eval"]["overlap"]
    ledger.write_text(json.dumps(entry) + "\n")
    assert ledger_record(arm, 3, args, ledger).rounds == rounds
    # made on another kind of machine: its round 0 is not this machine's, so it cannot pair with a baseline here
    ledger.write_text(json.dumps({**entry, "machine": "another CPU, torch 0.0"}) + "\n")
    assert ledger_record(arm, 3, args, ledger) is None


def test_a_candidate_recipe_is_compared_with_the_defaults_seed_by_seed(tmp_path):
    from benchmarks.quality import add_to_ledger
    from benchmarks.recipe_choice import candidate_row, ledger_runs

    arms = {a.name: a for a in ALL_ARMS}
    ledger = tmp_path / "runs.jsonl"
    defaults, pooled = (
        parse_args(["--seed-set", "tuning"]),
        parse_args(["--seed-set", "tuning", "--set", "reward.apo_normalization=pooled"]),
    )

    def add(arm: str, seed: int, final: float, args) -> None:
        rounds = [{"round": 0, "eval/gold_score": 0.4}, {"round": 1, "eval/gold_score": final}]
        add_to_ledger(arms[arm], RunRecord(arm, seed, rounds, wall_s=1.0), args, ledger)

    for seed, (default_gold, pooled_gold, fixed_gold) in enumerate([(1.0, 0.9, 0.5), (0.8, 0.6, 0.2), (1.2, 1.3, 0.4)]):
        add("APO-RJS", seed, default_gold, defaults)
        add("APO-RJS", seed, pooled_gold, pooled)
        add("RJS", seed, fixed_gold, defaults)  # the fixed arm does not read APO's keys: one run serves both
    assert [r.seed for r in ledger_runs("apo-rjs", ["reward.apo_normalization=pooled"], ledger)] == [0, 1, 2]
    row, numbers = candidate_row(
        "apo-rjs", "rjs", "reward.apo_normalization=pooled", ledger_runs("apo-rjs", [], ledger), ledger
    )
    # pooled - defaults: -0.1, -0.2, +0.1; pooled - fixed: 0.4, 0.4, 0.9
    assert numbers["final_vs_default"]["mean"] == pytest.approx(-0.2 / 3)
    assert numbers["final_vs_default"]["better_seeds"] == 1
    assert numbers["final_vs_fixed"]["mean"] == pytest.approx(1.7 / 3)
    assert row[:2] == ["reward.apo_normalization=pooled", 3]
    _, own = candidate_row("apo-rjs", "rjs", "", ledger_runs("apo-rjs", [], ledger), ledger)
    assert own["final_vs_default"] is None and own["final_vs_fixed"]["mean"] == pytest.approx(1.9 / 3)
