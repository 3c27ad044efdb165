"""When the held-out evaluation overlaps the next round, and where eval/kl takes the policy's log-probs
(apo_ray/held_out_evaluation.py). The overlapped figures equal the in-place ones: tests/test_resume.py
evaluates a round both ways and compares them."""

from apo_ray.config import load_config
from apo_ray.held_out_evaluation import in_place_reason, kl_from_sampler
from tests.conftest import REPO_ROOT


def config(name="default.yaml", *overrides):
    return load_config(REPO_ROOT / "configs" / name, list(overrides))


def test_the_default_overlaps_and_reads_kl_from_its_float32_vllm_sampler():
    assert in_place_reason(config()) == ""
    assert kl_from_sampler(config())


def test_in_place_when_asked_when_the_pool_samples_ahead_or_parameters_are_sharded():
    assert in_place_reason(config("default.yaml", "eval.overlap=false")) == "eval.overlap=false"
    assert "ppo.async_rollouts" in in_place_reason(config("grpo.yaml", "ppo.async_rollouts=true"))
    assert in_place_reason(config("grpo.yaml")) == ""
    assert "zero_stage=3" in in_place_reason(config("default.yaml", "learner.zero_stage=3"))


def test_kl_reads_the_policy_learner_unless_the_sampler_is_float32_vllm():
    assert not kl_from_sampler(config("default.yaml", "rollout.backend=hf"))
    assert not kl_from_sampler(config("default.yaml", "rollout.dtype=bfloat16"))


def test_the_summary_share_counts_game_rounds_only():
    from apo_ray.train import evaluate_share

    rows = [
        {"round": 0, "timing/round": 20.0, "timing/evaluate": 9.0},  # RM fit and warm-up: left out
        {"round": 1, "timing/round": 4.0, "timing/evaluate": 0.5},
        {"round": 2, "timing/round": 4.0},  # not evaluated
        {"round": 3, "timing/round": 6.0, "timing/evaluate": 3.0},
    ]
    assert evaluate_share(rows) == round(3.5 / 14.0, 3)
    assert evaluate_share(rows[:1]) is None
