"""The learning rate of each optimizer step of a stage: a pure function of the step, so that a run restarted
from a checkpoint continues on the same curve as an uninterrupted one."""

from __future__ import annotations

import math
from typing import get_args

from apo_ray.config import LRSchedule

SCHEDULES = get_args(LRSchedule)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Steps of linear warm-up: the ratio of the run's steps, rounded up (as transformers rounds it)."""
    return math.ceil(warmup_ratio * total_steps)


def learning_rate(base_lr: float, schedule: str, step: int, total_steps: int, warmup: int) -> float:
    """The lr of optimizer step `step` (0-based) of `total_steps`: a linear rise over the first `warmup` steps
    (step 0 already moves the weights: base_lr / warmup), then constant, or a linear or cosine decay that
    would reach 0 one step after the last."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0 <= step < total_steps:
        raise ValueError(f"lr schedule: step {step} outside 0..{total_steps - 1}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / (total_steps - warmup)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
