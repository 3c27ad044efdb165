"""Losses of the APO game in pure torch: the reward model's step and the offline policy steps.

Every loss is a mean over the batch and returns a scalar tensor. Log-probability helpers work on
right-padded batches with a 0/1 mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from apo_ray.evaluation import preference_accuracy
from apo_ray.metric_catalog import rank_reduction

PairLossKind = Literal["bt", "diff"]
ApoNormalization = Literal["per_term", "pooled"]
APO_NORMALIZATIONS = ("per_term", "pooled")


def _bradley_terry_terms(r_win: Tensor, r_lose: Tensor) -> Tensor:
    return -F.logsigmoid(r_win - r_lose)


def _score_difference_terms(r_win: Tensor, r_lose: Tensor) -> Tensor:
    return r_lose - r_win


def bradley_terry_loss(r_win: Tensor, r_lose: Tensor) -> Tensor:
    """-E log sigmoid(r_win - r_lose)."""
    return _bradley_terry_terms(r_win, r_lose).mean()


def score_difference_loss(r_win: Tensor, r_lose: Tensor) -> Tensor:
    """E[r_lose - r_win]: the raw score gap, the paper's WGAN-like "diff" variant (unbounded below)."""
    return _score_difference_terms(r_win, r_lose).mean()


# Per-pair losses, averaged by the caller.
_PAIR_TERMS = {"bt": _bradley_terry_terms, "diff": _score_difference_terms}


def _present(scores: Tensor | None) -> bool:
    return scores is not None and scores.numel() > 0


def apo_reward_loss(
    r_gold: Tensor | None,
    r_sample: Tensor | None,
    r_chosen: Tensor | None,
    r_rejected: Tensor | None,
    *,
    apo_coef: float,
    pref_coef: float,
    kind: PairLossKind = "bt",
    normalization: ApoNormalization = "per_term",
    minibatch_pairs: tuple[int, int] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The RM's APO step: apo_coef * pair_loss(gold, sample) + pref_coef * BT(chosen, rejected).

    `normalization` says what each term is averaged over. "per_term": each over its own pairs,
    apo_coef * mean(APO losses) + pref_coef * mean(human losses), so apo_coef weighs the whole APO term
    whatever the number of pairs. "pooled" (the authors' code): both summed and divided by the pairs of both,
    (apo_coef * sum(APO losses) + pref_coef * sum(human losses)) / (n_apo + n_human), so apo_coef weighs
    each APO pair against a human pair's pref_coef.

    A term whose scores are None or empty contributes nothing: no human pairs is the paper's GAIL-like
    ablation, no APO pairs is plain RM training. `kind` selects the pair loss of the APO term only. The
    human term stays Bradley-Terry in the "diff" variant because in the paper it is not a game term: it
    comes from the KL constraint that keeps the RM faithful to human preferences (the RM objective,
    Eq. 17), and the WGAN-like ablation replaces only the BT surrogate on gold-vs-sample pairs.

    `minibatch_pairs` = (APO pairs, human pairs) of the whole minibatch when these scores are one rank's share of
    it: the terms are then summed over the share and divided by the minibatch's counts, so that the losses of
    all shares add up to the minibatch's loss (None: the pairs given are the whole minibatch). "rm/apo_share" is
    then the minibatch's, from every share's parts of the two terms (`minibatch_stats`).

    Stats (python floats) are reported only for the terms present, on the pairs given; with minibatch_pairs also
    each mean's part (`<key>_part`: its share of the minibatch's mean), which the ranks add up
    (`combine_share_stats`), so that a multi-rank step reports the minibatch's means: "rm/loss" (the loss
    returned when minibatch_pairs is None, a mean of the ranks' in a multi-rank step),
    "rm/loss_apo" and "rm/loss_pref" (each term's mean over its own pairs, whatever the normalization),
    "rm/margin_apo", "rm/margin", "rm/acc_train_pref", and with APO pairs "rm/apo_share": the APO term's part of
    the loss, |APO part| / (|APO part| + |human part|), which apo_ray.apo_activity watches.
    """
    if kind not in _PAIR_TERMS:
        raise ValueError(f"kind: must be one of {', '.join(_PAIR_TERMS)}, got {kind!r}")
    if normalization not in APO_NORMALIZATIONS:
        raise ValueError(f"normalization: must be one of {', '.join(APO_NORMALIZATIONS)}, got {normalization!r}")
    has_apo = _present(r_gold) or _present(r_sample)
    has_pref = _present(r_chosen) or _present(r_rejected)
    if not (has_apo or has_pref):
        raise ValueError("apo_reward_loss: no APO pairs and no human pairs; nothing to train on")
    # (coefficient, per-pair losses, the pairs of the whole minibatch it is averaged over)
    terms: list[tuple[float, Tensor, int]] = []
    n_apo, n_pref = minibatch_pairs if minibatch_pairs is not None else (None, None)
    stats: dict[str, float] = {}
    if has_apo:
        if r_gold is None or r_sample is None or r_gold.shape != r_sample.shape:
            raise ValueError("r_gold and r_sample: must both be given with the same shape")
        apo_terms = _PAIR_TERMS[kind](r_gold, r_sample)
        terms.append((apo_coef, apo_terms, apo_terms.numel() if n_apo is None else n_apo))
        stats["rm/loss_apo"] = apo_terms.mean().item()
        stats["rm/margin_apo"] = (r_gold - r_sample).mean().item()
    if has_pref:
        if r_chosen is None or r_rejected is None or r_chosen.shape != r_rejected.shape:
            raise ValueError("r_chosen and r_rejected: must both be given with the same shape")
        pref_terms = _bradley_terry_terms(r_chosen, r_rejected)
        terms.append((pref_coef, pref_terms, pref_terms.numel() if n_pref is None else n_pref))
        stats["rm/loss_pref"] = pref_terms.mean().item()
        stats["rm/margin"] = (r_chosen - r_rejected).mean().item()
        stats["rm/acc_train_pref"] = preference_accuracy(r_chosen, r_rejected)
    given = [(coef, losses, losses.numel()) for coef, losses, _ in terms]
    parts = _term_parts(given, normalization, sum(n for _, _, n in given))
    loss_given = torch.stack(parts).sum()
    stats["rm/loss"] = loss_given.item()
    if minibatch_pairs is None:
        if has_apo:
            stats[_APO_SHARE] = _apo_share(parts[0].item(), parts[-1].item() if has_pref else 0.0)
        return loss_given, stats
    # Pooled over every pair of the minibatch, of both terms, whether or not this share holds pairs of each.
    parts = _term_parts(terms, normalization, sum(minibatch_pairs))
    if n_apo:
        # A share's ratio is not the minibatch's (a share may hold APO pairs alone): its parts are, added up.
        stats[_APO_PART] = parts[0].item() if has_apo else 0.0
        stats[_PREF_PART] = parts[-1].item() if has_pref else 0.0
    for keys, n_share, n_minibatch in (
        (_APO_MEANS, apo_terms.numel() if has_apo else 0, n_apo),
        (_PREF_MEANS, pref_terms.numel() if has_pref else 0, n_pref),
    ):
        for key in keys:
            if n_share:
                stats[key + PART] = stats[key] * n_share / n_minibatch
    return torch.stack(parts).sum(), stats


# A stat named <key>_part is one rank's share of a minibatch mean: the ranks' parts are added, not averaged (the
# metric catalog says so of each: apo_ray.metric_catalog).
PART = "_part"
_APO_SHARE, _APO_PART, _PREF_PART = "rm/apo_share", "rm/apo" + PART, "rm/pref" + PART
_APO_MEANS = ("rm/loss_apo", "rm/margin_apo")
_PREF_MEANS = ("rm/loss_pref", "rm/margin", "rm/acc_train_pref")


def _apo_share(apo_part: float, pref_part: float) -> float:
    # Magnitudes: the "diff" loss can be negative, and a share must still say how much the term weighs.
    total = abs(apo_part) + abs(pref_part)
    return abs(apo_part) / total if total > 0 else 0.0


_REDUCE = {"mean": np.mean, "sum": np.sum, "max": np.max}


def combine_stats(records: Sequence[dict[str, float]], by_rank: bool = False) -> dict[str, float]:
    """Each stat over the records that report it: averaged, or, for records of one step's ranks (`by_rank`),
    reduced as the metric catalog says (`rank_reduction`)."""
    keys = {key for record in records for key in record}
    return {
        key: float(
            _REDUCE[rank_reduction(key) if by_rank else "mean"]([record[key] for record in records if key in record])
        )
        for key in keys
    }


def combine_share_stats(shares: Sequence[dict[str, float]]) -> dict[str, float]:
    """One step's stats from its ranks' (those that had a share), each as the metric catalog says: a part
    (`<key>_part`) added, the rest averaged."""
    return combine_stats(shares, by_rank=True)


def minibatch_stats(step: dict[str, float]) -> dict[str, float]:
    """One RM step's stats, combined over its ranks' shares (combine_share_stats), with the minibatch's means in
    place of their parts and "rm/apo_share" in place of the two terms' parts: what the minibatch gives on one
    rank."""
    step = dict(step)
    if _APO_PART in step:
        step[_APO_SHARE] = _apo_share(step.pop(_APO_PART), step.pop(_PREF_PART))
    for key in [key for key in step if key.endswith(PART)]:
        step[key.removesuffix(PART)] = step.pop(key)
    return step


def _term_parts(
    terms: list[tuple[float, Tensor, int]], normalization: ApoNormalization, all_pairs: int
) -> list[Tensor]:
    """Each (coefficient, per-pair losses, pairs averaged over) term's part of the loss: averaged over its own
    pairs (per_term) or, with the other term, over `all_pairs` (pooled)."""
    if normalization == "per_term":
        return [coef * (losses.mean() if n == losses.numel() else losses.sum() / n) for coef, losses, n in terms]
    return [coef * losses.sum() / all_pairs for coef, losses, _ in terms]


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[:, t+1] | logits[:, t]): logits [B, T, V], labels [B, T] -> [B, T-1].

    Row by row, as gather minus logsumexp, so no [B, T, V] log-softmax is materialised; rows are
    computed in float32 because logsumexp in bfloat16 loses the small differences that matter here.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits [B,T,V] and labels [B,T] expected, got {tuple(logits.shape)}, {tuple(labels.shape)}")
    shifted_logits = logits[:, :-1]
    targets = labels[:, 1:].unsqueeze(-1)
    rows = []
    for row_logits, row_targets in zip(shifted_logits, targets):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where the 0/1 `mask` is 1; an all-zero mask gives 0 rather than NaN."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp_min(1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def sequence_logprob(token_logps: Tensor, mask: Tensor, *, average: bool) -> Tensor:
    """Per-sequence log-probability [B]: the sum over response tokens, or their mean if `average`."""
    if average:
        return masked_mean(token_logps, mask, dim=1)
    return (token_logps * mask.to(token_logps.dtype)).sum(dim=1)


def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood per response token, averaged over all response tokens of the batch."""
    return -masked_mean(token_logps, mask)


def _best_index_per_group(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Index of the highest reward in each group; ties go to the lowest index (torch.argmax's rule)."""
    best = []
    for group in torch.unique(group_ids):
        members = torch.nonzero(group_ids == group).squeeze(1)
        best.append(members[torch.argmax(rewards[members])])
    return torch.stack(best)


def rrhf_loss(
    token_logps: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    sft_coef: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """RRHF (Yuan et al. 2023) over N sampled responses, several per prompt.

    token_logps, mask: [N, T] response-token log-probs under the policy; rewards [N]; group_ids [N]
    (responses to the same prompt share an id). With p_i the length-normalised log-probability,
    L_rank = sum over pairs of one group with r_i < r_j of max(0, p_i - p_j), and L_sft is the token NLL
    of each group's best response. Both are averaged over groups so the scale does not grow with the
    number of prompts in a batch. Returns (L_rank + sft_coef * L_sft, stats).
    """
    if not (token_logps.shape[0] == rewards.shape[0] == group_ids.shape[0]):
        raise ValueError("token_logps, rewards, group_ids: must have the same number of rows")
    p = sequence_logprob(token_logps, mask, average=True)
    same_group = group_ids.unsqueeze(1) == group_ids.unsqueeze(0)
    i_worse_than_j = rewards.unsqueeze(1) < rewards.unsqueeze(0)
    hinge = torch.relu(p.unsqueeze(1) - p.unsqueeze(0))
    best = _best_index_per_group(rewards, group_ids)
    loss_rank = (hinge * (same_group & i_worse_than_j)).sum() / best.numel()
    loss_sft = -masked_mean(token_logps[best], mask[best], dim=1).mean()
    loss = loss_rank + sft_coef * loss_sft
    stats = {"policy/loss": loss.item(), "policy/loss_rank": loss_rank.item(), "policy/loss_sft": loss_sft.item()}
    return loss, stats


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023), TRL's "sigmoid" loss without label smoothing; inputs are sequence
    log-probs [B]. Implicit rewards are beta * (policy - reference) log-prob."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, pair_stats(loss, chosen_rewards, rejected_rewards)


def pair_stats(loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """The stats of a loss on chosen/rejected pairs (DPO, IPO), given each side's implicit reward [B]."""
    margin = chosen_rewards - rejected_rewards
    return {
        "policy/loss": loss.item(),
        "policy/rewards_chosen": chosen_rewards.mean().item(),
        "policy/rewards_rejected": rejected_rewards.mean().item(),
        "policy/rewards_margin": margin.mean().item(),
        "policy/rewards_accuracy": (margin > 0).float().mean().item(),
    }
