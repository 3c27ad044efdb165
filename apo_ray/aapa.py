"""AAPA's math (Adversarially Anchored Preference Alignment, arXiv 2509.25148 v2), pure: the discriminator's
loss, the anchoring reward it supplies, and the staged schedule that weighs it against the base objective.

What the paper's abstract fixes, and this follows: a lightweight sentence-level discriminator is trained once,
offline, to tell pre-collected expert responses from policy rollouts, and is then frozen; its signal is added to
an existing objective (SFT, GRPO, ...) without changing that objective's pipeline; a staged configuration
(anchor first, then the base objective with the anchor) works best. The formulas below are this project's
reading of that (the full text's equations were not available when this was written):

- discriminator: one logit d(x, y), D(x, y) = sigmoid(d) the probability that y is an expert answer to x,
  fitted by balanced binary cross-entropy,
      L_D = 1/2 * mean_expert softplus(-d) + 1/2 * mean_policy softplus(d);
- anchoring reward of a policy sample (GAIL's form, reward.kind=log_prob): r_anchor = log D(x, y) =
  -softplus(-d), at most 0, and near 0 for samples the discriminator takes for expert ones; or the raw logit
  d = log D - log(1 - D) (AIRL's form, kind=logit);
- the reward every policy step sees: r = w_base(t) * r_RM + coef * r_anchor, with w_base(t) = 0 in the first
  `anchor_only_rounds` rounds (the staged configuration's anchor stage) and 1 afterwards. For the online
  methods (GRPO, PPO, REINFORCE++) r is the sequence reward; for RJS / RRHF / DPO it is the score that picks
  the SFT target, the ranking or the DPO pair, so the anchor enters their objective as a weighted term of it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from apo_ray.evaluation import clustered_mean_and_stderr, win_fraction

AnchorKind = Literal["log_prob", "logit"]


def discriminator_loss(expert_logits: Tensor, policy_logits: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Balanced BCE of expert (label 1) vs policy samples (label 0); either side may be empty in a minibatch.

    Returns the loss and `aapa/disc_loss`, `aapa/disc_acc` (the mean of both sides' accuracies at D = 1/2)."""
    terms, accuracies = [], []
    if expert_logits.numel():
        terms.append(F.softplus(-expert_logits).mean())
        accuracies.append((expert_logits > 0).float().mean().item())
    if policy_logits.numel():
        terms.append(F.softplus(policy_logits).mean())
        accuracies.append((policy_logits < 0).float().mean().item())
    if not terms:
        raise ValueError("discriminator_loss: no expert and no policy logits")
    loss = torch.stack(terms).mean()
    return loss, {"aapa/disc_loss": loss.item(), "aapa/disc_acc": float(np.mean(accuracies))}


def expert_probability(logits: Sequence[float]) -> np.ndarray:
    """D(x, y) = sigmoid(d): the discriminator's score of a sample, the probability it is an expert answer."""
    d = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(d / 2.0))  # sigmoid that cannot overflow


def anchor_reward(logits: Sequence[float], kind: AnchorKind) -> np.ndarray:
    """r_anchor per sample from the discriminator's logits: log D = -softplus(-d) (log_prob) or d (logit)."""
    d = np.asarray(logits, dtype=np.float64)
    if kind == "log_prob":
        return -np.logaddexp(0.0, -d)
    if kind == "logit":
        return d
    raise ValueError(f"aapa.reward: must be one of log_prob, logit; got {kind!r}")


def base_weight(r: int, anchor_only_rounds: int) -> float:
    """w_base of round r >= 1: 0 in the staged configuration's anchor-only rounds 1..anchor_only_rounds, then 1."""
    if r < 1:
        raise ValueError(f"round: the policy steps from round 1, got {r}")
    return 0.0 if r <= anchor_only_rounds else 1.0


def anchored_rewards(rm_scores: Sequence[float], anchor: Sequence[float], *, base: float, coef: float) -> list[float]:
    """r = base * r_RM + coef * r_anchor, sample by sample."""
    if len(rm_scores) != len(anchor):
        raise ValueError(f"rm_scores and anchor: lengths differ ({len(rm_scores)} vs {len(anchor)})")
    return (base * np.asarray(rm_scores, dtype=np.float64) + coef * np.asarray(anchor, dtype=np.float64)).tolist()


def held_out_split(n_prompts: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The gold prompts the discriminator is fitted on and those kept to check it, by a seeded shuffle:
    round(fraction * n) held out, at least one when fraction > 0, never all of them."""
    order = list(range(n_prompts))
    random.Random(seed).shuffle(order)
    held = min(max(round(fraction * n_prompts), 1 if fraction > 0 else 0), n_prompts - 1)
    return sorted(order[held:]), sorted(order[:held])


def held_out_accuracy(
    expert_logits: dict[int, float], sample_logits: Sequence[float], sample_prompts: Sequence[int]
) -> tuple[float, float]:
    """How often the discriminator ranks a held-out prompt's expert answer above a policy sample for the same
    prompt (ties count half), over every such pair, with its standard error clustered by prompt (a prompt's
    pairs share its expert answer)."""
    expert = np.array([expert_logits[p] for p in sample_prompts], dtype=np.float64)
    wins = win_fraction(expert, np.asarray(sample_logits, dtype=np.float64))
    return clustered_mean_and_stderr(wins, list(sample_prompts))
