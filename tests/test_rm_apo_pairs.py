"""benchmarks/rm_apo_pairs.py's pure helpers: the arms' comparison, which fits a resumed run still makes, and
the kept samples' way back into APO pairs. The expensive run (sampling, fits) is not run here."""

import math

import pytest

from apo_ray.game import GoldAnswer, PreferencePair, Rollout
from benchmarks.rm_apo_pairs import Fit, apo_pairs_of, compare_arms, fits_to_run, reading, sample_record

SETTINGS = {"lr": 1e-4}


def a_fit(arm, seed, acc, ece, held_out=0.5, settings=SETTINGS):
    return Fit(
        arm=arm,
        seed=seed,
        dev={"rm/acc": acc, "rm/ece": ece, "rm/margin": 0.0},
        dev_apo={"rm/acc": held_out},
        train={},
        settings=settings,
        started_at="t",
        load_average=(1.0, 1.0),
    )


def test_the_arms_are_compared_seed_by_seed_with_a_t_interval():
    fits = [
        a_fit("human", 0, 0.60, 0.10),
        a_fit("apo", 0, 0.64, 0.05),
        a_fit("human", 1, 0.62, 0.08),
        a_fit("apo", 1, 0.63, 0.09),
    ]
    acc, ece = (compare_arms(fits)[k] for k in ("dev accuracy", "dev ECE"))
    # By hand: human mean 0.61, SD sqrt(0.0002) = 0.01414, SE 0.01.
    assert acc["human"]["mean"] == pytest.approx(0.61) and acc["human"]["stderr"] == pytest.approx(0.01)
    # Differences +0.04, +0.01: mean 0.025, SD 0.02121, SE 0.015, t(0.975, 1 df) = 12.706.
    diff = acc["apo_minus_human"]
    assert diff["mean"] == pytest.approx(0.025) and diff["stderr"] == pytest.approx(0.015)
    assert diff["low"] == pytest.approx(0.025 - 12.7062 * 0.015, abs=1e-4)
    assert diff["high"] == pytest.approx(0.025 + 12.7062 * 0.015, abs=1e-4)
    assert diff["per_seed"] == pytest.approx({0: 0.04, 1: 0.01}) and diff["better_seeds"] == 2
    # ECE -0.05, +0.01: one seed each way.
    assert ece["apo_minus_human"]["mean"] == pytest.approx(-0.02) and ece["apo_minus_human"]["better_seeds"] == 1


def test_a_seed_with_one_arm_only_is_left_out():
    fits = [a_fit("human", 0, 0.6, 0.1), a_fit("apo", 0, 0.7, 0.1), a_fit("human", 1, 0.5, 0.1)]
    acc = compare_arms(fits)["dev accuracy"]
    diff = acc["apo_minus_human"]
    assert diff["per_seed"] == pytest.approx({0: 0.1}) and diff["n"] == 1 and math.isnan(diff["low"])
    assert acc["human"]["n"] == 1 and acc["human"]["mean"] == pytest.approx(0.6)


def test_the_reading_turns_round_where_lower_is_better():
    higher = {"n": 5, "stderr": 0.01, "low": 0.01, "high": 0.03}
    covers = {**higher, "low": -0.01}
    assert reading(higher, lower_is_better=False) == "better"
    assert reading(higher, lower_is_better=True) == "worse"
    assert reading({**higher, "low": -0.03, "high": -0.01}, lower_is_better=True) == "better"
    assert reading(covers, lower_is_better=True) == "not worse (interval covers 0)"


def test_a_resumed_run_makes_only_the_fits_it_lacks_with_these_settings():
    done = [a_fit("human", 0, 0.6, 0.1), a_fit("apo", 0, 0.6, 0.1), a_fit("human", 1, 0.6, 0.1, settings={"lr": 1})]
    assert fits_to_run([0, 1, 2], ["human", "apo"], done, SETTINGS) == [
        ("human", 1),
        ("apo", 1),
        ("human", 2),
        ("apo", 2),
    ]
    assert fits_to_run([1, 2], ["apo"], done, SETTINGS) == [("apo", 1), ("apo", 2)]


def test_kept_samples_become_the_apo_pairs_build_apo_pairs_makes():
    gold = [GoldAnswer("p0", " gold zero"), GoldAnswer("p1", " gold one")]
    rollouts = [
        Rollout(
            prompt_index=0,
            prompt="p0",
            response="a sample",
            policy_version=0,
            finish_reason="length",
            response_token_ids=(5, 6),
        ),
        Rollout(prompt_index=1, prompt="p1", response="gold one", policy_version=0),
    ]
    records = [sample_record("gold", r, gold[r.prompt_index]) for r in rollouts]
    assert records[0]["response_tokens"] == 2 and records[0]["gold"] == " gold zero"
    # The second sample repeats its golden answer: build_apo_pairs drops it.
    assert apo_pairs_of(records + [{**records[0], "part": "dev"}], "gold", gold) == [
        PreferencePair("p0", " gold zero", "a sample")
    ]
