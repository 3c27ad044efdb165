"""RJS, rejection sampling: each prompt's best sample by RM score, then SFT on it."""

from __future__ import annotations

from apo_ray.game import best_of_n
from apo_ray.losses import sft_loss
from apo_ray.methods import Method, register_method


def loss(token_logps, mask):
    value = sft_loss(token_logps, mask)
    return value, {"policy/loss": value.item()}


def select(rollouts, scores, cfg):
    return best_of_n(rollouts, scores)


register_method(
    Method(
        "rjs",
        "offline",
        about="best-of-S, then SFT",
        # Chosen on the quality benchmark's tuning seeds (benchmarks/results/quality/tuning/).
        lr=1e-3,
        batch="samples",
        loss=loss,
        select=select,
    )
)
