"""The rule behind the "APO term inert" warning (apo_ray.apo_activity), on hand-made RM-step rows."""

from apo_ray.apo_activity import inert_apo_reason


def steps(*rows: tuple[float, float]) -> list[dict[str, float]]:
    return [{"rm/apo_share": share, "rm/loss_apo": loss} for share, loss in rows]


def test_a_share_below_the_threshold_at_every_step_is_inert():
    reason = inert_apo_reason(steps((0.02, 0.7), (0.024, 0.6)), min_share=0.05)
    assert reason is not None and reason.startswith("rm/apo_share stayed below reward.apo_inert_share=0.05")
    assert "at all 2 RM steps (at most 0.024)" in reason


def test_one_step_is_too_early_and_one_high_share_is_enough():
    assert inert_apo_reason(steps((0.02, 0.7)), min_share=0.05) is None
    assert inert_apo_reason(steps((0.02, 0.7), (0.06, 0.5)), min_share=0.05) is None


def test_a_loss_that_never_falls_below_its_first_step_is_inert():
    reason = inert_apo_reason(steps((0.3, 0.57), (0.3, 0.8), (0.3, 0.96)), min_share=0.05)
    assert reason is not None and reason.startswith("rm/loss_apo did not fall below its first RM step's 0.570 in 2")
    assert inert_apo_reason(steps((0.3, 0.57), (0.3, 0.8)), min_share=0.05) is None
    assert inert_apo_reason(steps((0.3, 0.57), (0.3, 0.8), (0.3, 0.5)), min_share=0.05) is None


def test_an_rm_restarted_each_round_is_judged_by_its_share_alone():
    # The re-initialisation ablation of the quality benchmark: a fresh RM's APO loss rose 0.36 -> 0.81 over
    # 5 rounds as the policy moved, at a share far above the threshold.
    rising = steps((0.3, 0.36), (0.4, 0.55), (0.45, 0.81))
    assert inert_apo_reason(rising, min_share=0.05) is not None
    assert inert_apo_reason(rising, min_share=0.05, restarts_each_round=True) is None
    assert inert_apo_reason(steps((0.02, 0.7), (0.024, 0.6)), min_share=0.05, restarts_each_round=True) is not None


def test_rows_without_an_apo_step_are_not_counted():
    rows = [{"rm/loss": 0.6}, *steps((0.02, 0.7)), {"eval/gold_score": 0.1}]
    assert inert_apo_reason(rows, min_share=0.05) is None
