"""Online policy-gradient math in pure torch: KL penalties, advantages (GAE, GRPO, REINFORCE++),
PPO's clipped losses and KL coefficient controllers.

Tensors are [B, T] over response tokens, right-padded, with a 0/1 mask that is 1 on real tokens.
Token-level losses average over all real tokens of the batch (as TRL and OpenRLHF do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from apo_ray.losses import masked_mean

T = TypeVar("T")

KLEstimator = Literal["k1", "k3"]


def concat_right_padded(parts: Sequence[Tensor]) -> Tensor:
    """Stack [b_i, w_i] grids into [sum b_i, max w_i], padding each on the right with zeros."""
    width = max(part.shape[1] for part in parts)
    return torch.cat([F.pad(part, (0, width - part.shape[1])) for part in parts])


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens.

    k1 = log pi - log pi_ref is unbiased but can be negative per token; k3 = (r - 1) - log r with
    r = pi_ref / pi is unbiased and never negative (Schulman, "Approximating KL divergence", 2020).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator: must be k1 or k3, got {estimator!r}")


def kl_limited_loss(
    ppo_loss: Tensor, logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_limit: float
) -> tuple[Tensor, float, bool]:
    """A hard limit on the policy's KL to the reference, for one minibatch: (loss, sequence KL, limited).

    The KL of the policy being updated is estimated on samples of the policy that drew them (`old_logp`),
    weighting each token by its probability ratio: sum_t (pi/pi_old)_t (log pi - log pi_ref)_t per response,
    averaged over rows. Unweighted, an update that pushes the sampled tokens down would look as if it moved
    toward the reference while it moves away. While the estimate is under `kl_limit` the loss is PPO's; at
    or above it the loss is the k3 KL itself averaged over tokens, whose gradient moves every token's
    log-prob toward the reference's: the update pulls the policy back instead of taking it further.
    """
    mask = mask.to(logp.dtype)
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        sequence_kl = (ratio * (logp - ref_logp) * mask).sum(dim=1).mean().item()
    if sequence_kl < kl_limit:
        return ppo_loss, sequence_kl, False
    return masked_mean(kl_penalty(logp, ref_logp, "k3"), mask), sequence_kl, True


def _last_token_index(mask: Tensor) -> Tensor:
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("mask: a row has no response token; it cannot carry a reward")
    # The first position where the running count reaches its maximum is the last real token.
    return mask.long().cumsum(dim=1).argmax(dim=1)


def per_token_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """-kl_coef * kl on every real token, plus the sequence score [B] on the last real token."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, _last_token_index(mask)] += score.to(rewards.dtype)
    return rewards


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns), both [B, T].

    Rewards and values are zeroed on padding, so the value after a row's last real token is 0 and
    nothing leaks back from the padding; advantages and returns are 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    steps = values.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to unit variance over the real tokens of the whole batch (and zero mean if
    `shift_mean`); padding is set to 0."""
    if not bool(mask.any()):
        raise ValueError("mask: no real token to whiten over")
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, float, float]:
    """PPO's clipped surrogate -> (loss, clipfrac, approx_kl).

    clipfrac is the fraction of real tokens where the clipped branch is the one in use;
    approx_kl = 0.5 * E[(log pi - log pi_old)^2], the estimate TRL logs.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask).item()
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask).item()
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, float]:
    """Clipped value loss 0.5 * E[max((v - R)^2, (v_clipped - R)^2)] -> (loss, clipfrac), where
    v_clipped keeps v within clip_eps of the value at rollout time."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask).item()
    return loss, clipfrac


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the next-token distributions logits [B, T, V] over the real positions [B, T].

    Row by row, so only one [T, V] probability table exists at a time.
    """
    rows = []
    for row_logits in logits:
        row_logits = row_logits.float()
        probabilities = torch.softmax(row_logits, dim=-1)
        rows.append(torch.logsumexp(row_logits, dim=-1) - (probabilities * row_logits).sum(dim=-1))
    return masked_mean(torch.stack(rows), mask)


def grpo_advantages(scores: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024): (score - group mean) / (group std + eps), per sample [N].

    The std is the sample std (as TRL); a group of one has no one to compare with and gets 0.
    """
    if not scores.is_floating_point():
        scores = scores.float()
    advantages = torch.zeros_like(scores)
    for group in torch.unique(group_ids):
        members = group_ids == group
        group_scores = scores[members]
        if group_scores.numel() < 2:
            continue
        advantages[members] = (group_scores - group_scores.mean()) / (group_scores.std() + eps)
    return advantages


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} within each right-padded row; 0 on padding."""
    # GAE with zero values and lambda = 1 is exactly the discounted return.
    returns, _ = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return returns


def reinforce_plus_plus_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025): discounted returns of the per-token rewards (score at the end, KL penalty
    on every token; see `per_token_rewards`), whitened over all real tokens of the batch."""
    return whiten(discounted_returns(rewards, mask, gamma), mask)


class KLController(Protocol):
    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): moves the coefficient so that the measured KL
    approaches `target`, by at most 20% of n_steps / horizon per update."""

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon: must be > 0, got {target}, {horizon}")
        self.value = init_value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def sampler_logprob_grid(prompt_lengths: list[int], sampler_logprobs: list[list[float]], width: int) -> Tensor:
    """The sampler's per-token log-probs laid out on the learners' [N, width] grid (`token_logprobs`):
    response token j of a sample whose prompt has P tokens sits at sequence position P + j, so its log-prob
    is in column P + j - 1. Padding is 0."""
    grid = torch.zeros(len(prompt_lengths), width)
    for row, (length, logprobs) in enumerate(zip(prompt_lengths, sampler_logprobs)):
        if length < 1 or length - 1 + len(logprobs) > width:
            raise ValueError(
                f"row {row}: a {length}-token prompt and {len(logprobs)} log-probs do not fit width {width}"
            )
        grid[row, length - 1 : length - 1 + len(logprobs)] = torch.tensor(logprobs, dtype=grid.dtype)
    return grid


def evenly_spread(items: Sequence[T], at_most: int | None) -> list[T]:
    """At most `at_most` of `items` (all of them for None), evenly spaced from the first: the rows a check
    reads, spread over the round's prompts rather than bunched at its start."""
    if at_most is None or len(items) <= at_most:
        return list(items)
    return [items[i * len(items) // at_most] for i in range(at_most)]


def logprob_mismatch(sampler_logp: Tensor, learner_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the sampling engine's log-probs of the sampled tokens are from the learner's on the same
    weights: mean and max of |sampler - learner| over real tokens (different numerics, dtype, kernels)."""
    diff = (sampler_logp - learner_logp).abs()
    real = mask.bool()
    return {
        "rollout/logprob_diff": masked_mean(diff, mask).item(),
        "rollout/logprob_diff_max": diff[real].max().item() if bool(real.any()) else 0.0,
    }


def truncated_importance_weights(
    learner_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS, as verl and TRL offer it): per-token weights
    min(pi_learner / pi_sampler, cap) of the tokens the sampler drew, 0 on padding, and their stats.

    The samples came from the sampler's distribution while PPO's ratio is taken against the learner's
    log-probs of the same weights; the weight corrects the gradient for the gap. Truncation at `cap` bounds
    the variance a token the sampler found unlikely would add. Weights are >= 0, so multiplying the
    advantages by them equals multiplying PPO's clipped per-token loss."""
    mask = mask.to(learner_logp.dtype)
    ratio = torch.exp(learner_logp - sampler_logp)
    weights = torch.clamp(ratio, max=cap) * mask
    stats = {
        "policy/tis_weight_mean": masked_mean(weights, mask).item(),
        "policy/tis_clipped_fraction": masked_mean((ratio > cap).to(mask.dtype), mask).item(),
    }
    return weights, stats


class GridRows:
    """Rows `idx` of batch-wide [N, W] token grids, cut to a minibatch's own width `width`.

    Rows are right-padded, so a minibatch encoded on its own has the same tokens in its first columns.
    """

    def __init__(self, idx: list[int], width: int, device: torch.device):
        self.idx, self.width, self.device = idx, width, device

    def of(self, grid: Tensor) -> Tensor:
        return grid[self.idx, : self.width].to(self.device)


@dataclass
class TokenGrids:
    """Per-token quantities of a batch of rollouts on the policy's token grid, all [N, W]."""

    logps: Tensor  # under the policy that sampled them, recomputed by the learner
    ref_logps: Tensor
    mask: Tensor
    values: Tensor | None  # the critic's, ppo only


def kl_penalized_rewards(scores: Tensor, grids: TokenGrids, *, kl_estimator: KLEstimator, kl_coef: float) -> Tensor:
    """The rewards of the methods that penalise KL inside them (ppo, reinforce_pp): each sample's score on its
    last token, -kl_coef * the KL to the reference on every token [N, W]."""
    mask = grids.mask.to(grids.logps.dtype)
    return per_token_rewards(scores, kl_penalty(grids.logps, grids.ref_logps, kl_estimator), mask, kl_coef)
