"""PPO (Schulman et al. 2017) with a critic: GAE advantages of the KL-penalised rewards, the critic regressed on
the returns."""

from __future__ import annotations

from apo_ray.methods import Method, register_method
from apo_ray.ppo import gae_advantages, kl_penalized_rewards, whiten


def advantages(scores, grids, *, ppo, kl_coef, group_ids=None):
    if grids.values is None:
        raise ValueError("advantages: ppo needs the critic's values")
    rewards = kl_penalized_rewards(scores, grids, kl_estimator=ppo.kl_estimator, kl_coef=kl_coef)
    mask = grids.mask.to(grids.logps.dtype)
    advantages, returns = gae_advantages(rewards, grids.values, mask, ppo.gamma, ppo.lam)
    return (whiten(advantages, mask) if ppo.whiten_advantages else advantages), returns


register_method(
    Method(
        "ppo",
        "online",
        about="critic, GAE",
        lr=3e-4,  # configs/ppo.yaml's
        roles=("critic",),
        keys=(
            "ppo.lam",
            "ppo.whiten_advantages",
            "ppo.critic_init",
            "ppo.critic_lr",
            "ppo.value_clip_eps",
            "learner.critic_ranks",
            "ppo.gamma",
        ),
        advantages=advantages,
    )
)
