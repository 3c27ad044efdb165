"""The stages' lr schedule against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from apo_ray.stages.lr_schedule import learning_rate, warmup_steps


def curve(schedule: str, total: int, warmup: int) -> list[float]:
    return [learning_rate(1.0, schedule, step, total, warmup) for step in range(total)]


def test_warmup_rises_linearly_to_the_base_lr_and_the_decays_end_just_above_zero():
    assert curve("constant", 4, 0) == [1.0] * 4
    assert curve("constant", 5, 2) == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert curve("linear", 6, 2) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert curve("linear", 4, 0) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert curve("cosine", 4, 0) == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    )
    assert learning_rate(5e-5, "linear", 150, 300, 30) == pytest.approx(5e-5 * (1 - 120 / 270))


def test_warmup_steps_round_up_and_bad_arguments_are_named():
    assert warmup_steps(0.0, 150) == 0 and warmup_steps(0.1, 150) == 15 and warmup_steps(0.1, 151) == 16
    with pytest.raises(ValueError, match="'step' is not one of constant, linear, cosine"):
        learning_rate(1.0, "step", 0, 4, 0)
    with pytest.raises(ValueError, match="step 4 outside 0..3"):
        learning_rate(1.0, "linear", 4, 4, 0)
