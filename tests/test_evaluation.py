import math

import numpy as np
import pytest
import torch

from apo_ray.evaluation import (
    calibration_bins,
    expected_calibration_error,
    mean_and_stderr,
    preference_accuracy,
)


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor])
def test_preference_accuracy_counts_ties_half(convert):
    # correct, tie, wrong, correct -> 2.5 / 4
    chosen = convert([1.0, 2.0, 3.0, 0.0])
    rejected = convert([0.0, 2.0, 4.0, -1.0])
    accuracy = preference_accuracy(chosen, rejected)
    assert isinstance(accuracy, float)
    assert accuracy == pytest.approx(0.625)


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
