import math

import numpy as np
import pytest
import torch

from apo_ray.evaluation import (
    calibration_bins,
    clustered_mean_and_stderr,
    expected_calibration_error,
    mean_and_stderr,
    policy_sample_stats,
    preference_accuracy,
    preference_accuracy_and_stderr,
    rise_line,
    score_rise,
    stratified_mean_and_stderr,
    within_group_pairs,
)


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor])
def test_preference_accuracy_counts_ties_half(convert):
    # correct, tie, wrong, correct -> 2.5 / 4
    chosen = convert([1.0, 2.0, 3.0, 0.0])
    rejected = convert([0.0, 2.0, 4.0, -1.0])
    accuracy = preference_accuracy(chosen, rejected)
    assert isinstance(accuracy, float)
    assert accuracy == pytest.approx(0.625)


def test_preference_accuracy_and_stderr_by_hand():
    # wins 1, 0.5, 0, 1: mean 0.625, sample std sqrt(0.229167), / 2
    accuracy, stderr = preference_accuracy_and_stderr([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    assert accuracy == 0.625
    assert stderr == pytest.approx(math.sqrt(((0.375**2) * 2 + 0.125**2 + 0.625**2) / 3) / 2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="lengths differ"):
        preference_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="r_chosen: empty"):
        preference_accuracy([], [])
    with pytest.raises(ValueError, match="1-d"):
        preference_accuracy([[1.0]], [[0.0]])
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins([1.0], [0.0], n_bins=0)


def test_mean_and_stderr():
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    # sample std sqrt(5/3), over sqrt(4)
    assert (mean, stderr) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    single_mean, single_err = mean_and_stderr([7.0])
    assert single_mean == 7.0 and math.isnan(single_err)


def _calibration_example():
    # margins (r_rejected = 0): ln 3 -> p 0.75, right; -ln 3 -> confidence 0.75, wrong;
    # ln 19 -> p 0.95, right (twice); 0 -> a tie at confidence 0.5, half right.
    margins = [math.log(3), -math.log(3), math.log(19), math.log(19), 0.0]
    return margins, [0.0] * len(margins)


def test_calibration_bins_by_hand_with_empty_bins():
    bins = calibration_bins(*_calibration_example(), n_bins=5)
    assert [b.count for b in bins] == [1, 0, 2, 0, 2]
    assert [b.lower for b in bins] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert bins[4].upper == pytest.approx(1.0)
    assert (bins[0].confidence, bins[0].accuracy) == pytest.approx((0.5, 0.5))
    assert (bins[2].confidence, bins[2].accuracy) == pytest.approx((0.75, 0.5))
    assert (bins[4].confidence, bins[4].accuracy) == pytest.approx((0.95, 1.0))
    assert bins[1].confidence is None and bins[3].accuracy is None


def test_expected_calibration_error_by_hand():
    # 1/5 * |0.5 - 0.5| + 2/5 * |0.5 - 0.75| + 2/5 * |1.0 - 0.95| = 0.1 + 0.02
    assert expected_calibration_error(*_calibration_example(), n_bins=5) == pytest.approx(0.12)


def test_full_confidence_lands_in_last_bin():
    bins = calibration_bins([100.0], [0.0], n_bins=5)
    assert bins[-1].count == 1 and bins[-1].confidence == pytest.approx(1.0)
    assert expected_calibration_error([100.0], [0.0]) == pytest.approx(0.0)


def test_stratified_mean_and_stderr_by_hand():
    # group a: 1, 3 (mean 2, s^2 2); group b: 2, 2, 5 (mean 3, s^2 3): mean of means 2.5,
    # SE = sqrt(2 / 2 + 3 / 3) / 2 = sqrt(2) / 2
    mean, stderr = stratified_mean_and_stderr([1.0, 3.0, 2.0, 2.0, 5.0], ["a", "a", "b", "b", "b"])
    assert mean == pytest.approx(2.5)
    assert stderr == pytest.approx(math.sqrt(2.0) / 2.0)


def test_stratified_stderr_ignores_differences_between_groups():
    # Constant within each group: the groups are fixed, so nothing is left to vary.
    assert stratified_mean_and_stderr([0.0, 0.0, 9.0, 9.0], [0, 0, 1, 1]) == (4.5, 0.0)
    assert math.isnan(stratified_mean_and_stderr([1.0, 2.0, 3.0], [0, 0, 1])[1])


def test_clustered_mean_and_stderr_by_hand():
    # clusters a: 1, 0 (sum 1), b: 1, 1 (sum 2); mean 0.75; deviations 1 - 1.5, 2 - 1.5;
    # SE = sqrt(2 / 1 * 0.5) / 4 = 0.25
    assert clustered_mean_and_stderr([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"]) == (0.75, pytest.approx(0.25))
    assert math.isnan(clustered_mean_and_stderr([1.0, 0.0], ["a", "a"])[1])
    with pytest.raises(ValueError, match="clusters: 1 group labels for 2 values"):
        clustered_mean_and_stderr([1.0, 0.0], ["a"])


def test_within_group_pairs_drop_ties_and_never_cross_groups():
    winners, losers, groups = within_group_pairs(["p", "p", "p", "q", "q"], [1.0, 2.0, 2.0, 0.0, -1.0])
    # p: (0, 1) -> 1 wins, (0, 2) -> 2 wins, (1, 2) tie dropped; q: (3, 4) -> 3 wins
    assert winners.tolist() == [1, 2, 3] and losers.tolist() == [0, 0, 4] and groups == ["p", "p", "q"]


def test_policy_sample_stats_by_hand():
    groups = [0, 0, 1, 1]
    judge = [1.0, 0.0, 2.0, 2.0]  # prompt 1's samples tie: one pair, sample 0 over sample 1
    rm = [0.5, 1.5, 3.0, 0.0]  # the RM gets it wrong
    stats = policy_sample_stats(
        groups, judge, rm, kl=[0.1, 0.3, 0.2, 0.2], lengths=[4, 6, 5, 5], judge_terms={"topic": [1.0, 0.0, 1.0, 1.0]}
    )
    assert stats["eval/samples"] == 4 and stats["rm/policy_pairs"] == 1
    assert stats["eval/gold_score"] == pytest.approx(1.25)  # (0.5 + 2) / 2
    # within prompt 0: s^2 = 0.5, n = 2; prompt 1: 0 -> sqrt(0.25) / 2
    assert stats["eval/gold_score_se"] == pytest.approx(0.25)
    assert stats["eval/kl"] == pytest.approx(0.2) and stats["eval/response_length"] == pytest.approx(5.0)
    assert stats["eval/gold_topic"] == pytest.approx(0.75) and stats["eval/gold_topic_se"] == pytest.approx(0.25)
    assert stats["rm/acc_policy"] == 0.0 and math.isnan(stats["rm/acc_policy_se"])
    assert stats["rm/ece_policy"] == pytest.approx(1.0 / (1.0 + math.exp(-1.0)))


def test_score_rise_and_its_line():
    rise = score_rise(
        {"eval/gold_score": -0.5, "eval/gold_score_se": 0.03}, {"eval/gold_score": -0.3, "eval/gold_score_se": 0.04}
    )
    assert rise["change"] == pytest.approx(0.2) and rise["change_se"] == pytest.approx(0.05)
    assert rise["exceeds_3_se"]  # 0.2 > 0.15
    assert rise_line("eval/gold_score", rise) == (
        "eval/gold_score -0.500 -> -0.300 (+- 0.030, 0.040): change +0.200 +- 0.050, rose by more than 3 SE"
    )
    flat = score_rise(
        {"eval/gold_score": 0.0, "eval/gold_score_se": 0.1}, {"eval/gold_score": 0.2, "eval/gold_score_se": 0.1}
    )
    assert not flat["exceeds_3_se"] and "within 3 SE" in rise_line("eval/gold_score", flat)
    assert score_rise({"eval/gold_score": 0.0}, {"eval/gold_score": 0.2, "eval/gold_score_se": 0.1}) is None
