"""Evaluation metrics for reward models and policies: preference accuracy, calibration, win rate.

Inputs may be python lists, numpy arrays or torch tensors; results are python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

Scores = Union[Sequence[float], np.ndarray, torch.Tensor]


def _as_array(values: Scores, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence of scores, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: empty")
    return array


def _paired(first: Scores, second: Scores, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(first, names[0]), _as_array(second, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]}: lengths differ ({a.size} vs {b.size})")
    return a, b


def _win_fraction(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a > b, 0 where a < b, 0.5 on ties: a tie is a coin flip, not a win or a loss."""
    return (a > b) + 0.5 * (a == b)


def preference_accuracy(r_chosen: Scores, r_rejected: Scores) -> float:
    """Fraction of pairs where the chosen response scores higher; ties count half."""
    chosen, rejected = _paired(r_chosen, r_rejected, ("r_chosen", "r_rejected"))
    return float(_win_fraction(chosen, rejected).mean())


def mean_and_stderr(values: Scores) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); the error is NaN for a single value."""
    array = _as_array(values, "values")
    if array.size == 1:
        return float(array[0]), math.nan
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a reliability diagram over predicted confidence in [lower, upper)."""

    lower: float
    upper: float
    count: int
    # None for an empty bin: it has no confidence or accuracy to plot.
    confidence: Optional[float]
    accuracy: Optional[float]


def calibration_bins(r_chosen: Scores, r_rejected: Scores, n_bins: int = 10) -> list[CalibrationBin]:
    """Bin pairs by the RM's confidence in its own prediction.

    The Bradley-Terry probability that the chosen response wins is p = sigmoid(r_chosen - r_rejected).
    The RM predicts the more likely side, with confidence max(p, 1 - p) in [0.5, 1]; the prediction is
    right when p > 0.5 (a tie, p = 0.5, counts half, as in `preference_accuracy`). Bins have equal width
    over [0.5, 1]; the last bin includes 1.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins: must be >= 1, got {n_bins}")
    chosen, rejected = _paired(r_chosen, r_rejected, ("r_chosen", "r_rejected"))
    margin = chosen - rejected
    p_chosen = 1.0 / (1.0 + np.exp(-margin))
    confidence = np.maximum(p_chosen, 1.0 - p_chosen)
    correct = _win_fraction(chosen, rejected)
    width = 0.5 / n_bins
    index = np.minimum(((confidence - 0.5) / width).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        in_bin = index == b
        count = int(in_bin.sum())
        bins.append(
            CalibrationBin(
                lower=0.5 + b * width,
                upper=0.5 + (b + 1) * width,
                count=count,
                confidence=float(confidence[in_bin].mean()) if count else None,
                accuracy=float(correct[in_bin].mean()) if count else None,
            )
        )
    return bins


def expected_calibration_error(r_chosen: Scores, r_rejected: Scores, n_bins: int = 10) -> float:
    """ECE = sum over bins of |bin| / n * |accuracy - confidence| (Guo et al. 2017), bins as in
    `calibration_bins`.

    The APO authors' code reports sklearn's `calibration_curve` over both orderings of every pair and
    averages |accuracy - confidence| over non-empty bins without weighting by bin size; that number
    can be computed from `calibration_bins` too. Here the bins are weighted by how many pairs they hold.
    """
    bins = calibration_bins(r_chosen, r_rejected, n_bins)
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count))
