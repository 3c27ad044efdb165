"""Evaluation metrics for reward models and policies: preference accuracy, calibration, win rate.

Inputs may be python lists, numpy arrays or torch tensors; results are python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Scores = Sequence[float] | np.ndarray | torch.Tensor


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


def win_fraction(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a > b, 0 where a < b, 0.5 on ties: a tie is a coin flip, not a win or a loss."""
    return (a > b) + 0.5 * (a == b)


def preference_accuracy(r_chosen: Scores, r_rejected: Scores) -> float:
    """Fraction of pairs where the chosen response scores higher; ties count half."""
    chosen, rejected = _paired(r_chosen, r_rejected, ("r_chosen", "r_rejected"))
    return float(win_fraction(chosen, rejected).mean())


def preference_accuracy_and_stderr(r_chosen: Scores, r_rejected: Scores) -> tuple[float, float]:
    """`preference_accuracy` and its standard error, the pairs being independent."""
    chosen, rejected = _paired(r_chosen, r_rejected, ("r_chosen", "r_rejected"))
    return mean_and_stderr(win_fraction(chosen, rejected))


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
    confidence: float | None
    accuracy: float | None


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
    correct = win_fraction(chosen, rejected)
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


def _groups_of(groups: Sequence, n: int, name: str) -> list[np.ndarray]:
    """Index arrays of the items of each group, in order of first appearance."""
    if len(groups) != n:
        raise ValueError(f"{name}: {len(groups)} group labels for {n} values")
    members: dict = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    return [np.asarray(indices) for indices in members.values()]


def stratified_mean_and_stderr(values: Scores, groups: Sequence) -> tuple[float, float]:
    """Mean over groups of each group's mean, and its standard error with the groups held fixed:
    sqrt(sum_g s_g^2 / n_g) / G, s_g the sample std of group g's n_g values.

    For the evaluation's samples, several per held-out prompt: the prompts are the same at every evaluation
    of a run (and across runs of one task), so the noise between two evaluations is the policy's sampling
    within each prompt, not which prompts were drawn. The error is NaN when a group has a single value.
    """
    array = _as_array(values, "values")
    members = _groups_of(groups, array.size, "groups")
    means = np.array([array[m].mean() for m in members])
    if min(m.size for m in members) < 2:
        return float(means.mean()), math.nan
    variance = sum(array[m].var(ddof=1) / m.size for m in members)
    return float(means.mean()), float(math.sqrt(variance) / len(members))


def clustered_mean_and_stderr(values: Scores, clusters: Sequence) -> tuple[float, float]:
    """Mean of `values` and its cluster-robust standard error: with S_c and n_c the sum and count of cluster
    c's values, C clusters and N values, mean m = sum S_c / N and SE = sqrt(C / (C - 1) * sum (S_c - m n_c)^2) / N.

    For pairs drawn within prompts: every pair of a prompt shares samples with the others, so the pairs are not
    independent, but prompts are. NaN with a single cluster.
    """
    array = _as_array(values, "values")
    members = _groups_of(clusters, array.size, "clusters")
    mean = float(array.mean())
    if len(members) < 2:
        return mean, math.nan
    deviations = np.array([array[m].sum() - mean * m.size for m in members])
    count = len(members)
    return mean, float(math.sqrt(count / (count - 1) * (deviations**2).sum()) / array.size)


def within_group_pairs(groups: Sequence, judge: Scores) -> tuple[np.ndarray, np.ndarray, list]:
    """Every pair of two items of one group that the judge tells apart, ties dropped: (winner indices, loser
    indices, each pair's group), pairs in order of group, then of first item."""
    scores = _as_array(judge, "judge")
    winners, losers, pair_groups = [], [], []
    for members in _groups_of(groups, scores.size, "groups"):
        for position, a in enumerate(members):
            for b in members[position + 1 :]:
                if scores[a] == scores[b]:
                    continue
                win, lose = (a, b) if scores[a] > scores[b] else (b, a)
                winners.append(win)
                losers.append(lose)
                pair_groups.append(groups[a])
    return np.asarray(winners, dtype=np.int64), np.asarray(losers, dtype=np.int64), pair_groups


def policy_sample_stats(
    groups: Sequence,
    judge: Scores,
    rm_scores: Scores,
    kl: Scores,
    lengths: Scores,
    judge_terms: dict[str, Sequence[float]] | None = None,
) -> dict[str, float]:
    """The evaluation's statistics of the policy's samples, several per held-out prompt (`groups`: each sample's
    prompt). Every mean comes with `<key>_se`.

    eval/gold_score, eval/rm_score, eval/kl, eval/response_length (and eval/gold_<term> for each of
    `judge_terms`): stratified means over prompts (`stratified_mean_and_stderr`). rm/acc_policy and
    rm/ece_policy: the RM on every within-prompt pair the judge tells apart (ties dropped), the accuracy's error
    clustered by prompt; ECE is a weighted absolute gap, not a mean, and has no error here.
    eval/samples and rm/policy_pairs say how many samples and pairs were judged.
    """
    stats: dict[str, float] = {"eval/samples": float(len(groups))}
    columns = {"eval/gold_score": judge, "eval/rm_score": rm_scores, "eval/kl": kl, "eval/response_length": lengths}
    columns.update({f"eval/gold_{term}": values for term, values in (judge_terms or {}).items()})
    for key, values in columns.items():
        stats[key], stats[f"{key}_se"] = stratified_mean_and_stderr(values, groups)
    winners, losers, pair_groups = within_group_pairs(groups, judge)
    stats["rm/policy_pairs"] = float(winners.size)
    if winners.size:
        rm = _as_array(rm_scores, "rm_scores")
        correct = win_fraction(rm[winners], rm[losers])
        stats["rm/acc_policy"], stats["rm/acc_policy_se"] = clustered_mean_and_stderr(correct, pair_groups)
        stats["rm/ece_policy"] = expected_calibration_error(rm[winners], rm[losers])
    return stats


def score_rise(start: dict, end: dict, key: str = "eval/gold_score", n_se: float = 3.0) -> dict | None:
    """How `key` moved between two evaluations (metric rows with `key` and `<key>_se`): start, end, change
    and its standard error, the two errors added in quadrature, and whether the change exceeds `n_se` of them.
    Quadrature is exact for independent samples and conservative for the evaluation's, which reuse one sampling
    seed at every round and so correlate positively. None when either row lacks the mean or its error."""
    values = [row.get(name) for row in (start, end) for name in (key, f"{key}_se")]
    if any(value is None or not math.isfinite(value) for value in values):
        return None
    start_value, start_se, end_value, end_se = values
    change, change_se = end_value - start_value, math.sqrt(start_se**2 + end_se**2)
    return {
        "start": start_value,
        "start_se": start_se,
        "end": end_value,
        "end_se": end_se,
        "change": change,
        "change_se": change_se,
        f"exceeds_{n_se:g}_se": abs(change) > n_se * change_se,
        "n_se": n_se,
    }


def rise_line(key: str, rise: dict) -> str:
    """One line: `key start -> end (+- SE)`, the change with its error, and whether it exceeds n_se of them."""
    n_se = rise["n_se"]
    verdict = (
        f"{'rose' if rise['change'] > 0 else 'fell'} by more than {n_se:g} SE"
        if rise[f"exceeds_{n_se:g}_se"]
        else f"within {n_se:g} SE (no clear change)"
    )
    return (
        f"{key} {rise['start']:.3f} -> {rise['end']:.3f} (+- {rise['start_se']:.3f}, {rise['end_se']:.3f}): "
        f"change {rise['change']:+.3f} +- {rise['change_se']:.3f}, {verdict}"
    )
