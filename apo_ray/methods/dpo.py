"""DPO (Rafailov et al. 2023) on each prompt's best vs worst sample by RM score (apo_ray.losses.dpo_loss)."""

from __future__ import annotations

from apo_ray.game import best_and_worst
from apo_ray.losses import dpo_loss
from apo_ray.methods import Method, register_method


def select(rollouts, scores, cfg):
    return best_and_worst(rollouts, scores, min_margin=cfg.policy.dpo_min_margin)


register_method(
    Method(
        "dpo",
        "offline",
        about="best vs worst by RM score",
        # At 1e-3 DPO lost gold from round 1 on the tuning seeds (benchmarks/results/quality/tuning/).
        lr=1e-4,
        min_samples_per_prompt=2,
        why_min_samples="it pairs the best with the worst",
        keys=("policy.dpo_beta", "policy.dpo_min_margin"),
        batch="pairs",
        loss=dpo_loss,
        select=select,
        settings=lambda cfg: {"beta": cfg.policy.dpo_beta},
    )
)
