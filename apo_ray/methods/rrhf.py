"""RRHF (Yuan et al. 2023): rank every sample of a prompt by RM score, plus SFT on the best
(apo_ray.losses.rrhf_loss)."""

from __future__ import annotations

from apo_ray.losses import rrhf_loss
from apo_ray.methods import Method, register_method


def select(rollouts, scores, cfg):
    return list(zip(rollouts, scores))


register_method(
    Method(
        "rrhf",
        "offline",
        about="ranking every sample, plus SFT on the best",
        # At 1e-3 RRHF lost gold from round 1 on the tuning seeds, and still did at 3e-5
        # (benchmarks/results/quality/tuning/).
        lr=1e-5,
        min_samples_per_prompt=2,
        why_min_samples="it ranks them",
        keys=("policy.rrhf_sft_coef",),
        batch="groups",
        loss=rrhf_loss,
        select=select,
        settings=lambda cfg: {"sft_coef": cfg.policy.rrhf_sft_coef},
    )
)
