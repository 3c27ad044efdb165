"""GRPO (Shao et al. 2024): every token of a sample gets its score normalised within its prompt's group; the KL
to the reference is a term of the policy's loss."""

from __future__ import annotations

from apo_ray.methods import Method, register_method
from apo_ray.ppo import grpo_advantages


def advantages(scores, grids, *, ppo, kl_coef, group_ids=None):
    if group_ids is None:
        raise ValueError("advantages: grpo needs group_ids (the prompt of each sample)")
    return grpo_advantages(scores, group_ids)[:, None] * grids.mask.to(grids.logps.dtype), None


register_method(
    Method(
        "grpo",
        "online",
        about="group-normalised scores, no critic",
        lr=3e-4,  # configs/grpo.yaml's
        min_samples_per_prompt=2,
        why_min_samples="it normalises scores within a prompt's group",
        advantages=advantages,
        kl_in_loss=True,
    )
)
