"""REINFORCE++ (Hu 2025): discounted returns of the KL-penalised rewards, whitened over the batch; no critic."""

from __future__ import annotations

from apo_ray.methods import Method, register_method
from apo_ray.ppo import kl_penalized_rewards, reinforce_plus_plus_advantages


def advantages(scores, grids, *, ppo, kl_coef, group_ids=None):
    rewards = kl_penalized_rewards(scores, grids, kl_estimator=ppo.kl_estimator, kl_coef=kl_coef)
    return reinforce_plus_plus_advantages(rewards, grids.mask.to(grids.logps.dtype), ppo.gamma), None


register_method(
    Method(
        "reinforce_pp",
        "online",
        about="batch-whitened returns, no critic",
        lr=3e-4,
        keys=("ppo.gamma",),
        advantages=advantages,
    )
)
