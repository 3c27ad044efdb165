"""AAPA (apo_ray/aapa.py, apo_ray/anchoring.py, actors/discriminator.py): the discriminator's loss, the anchoring
reward and the staged schedule against hand-computed values; its config; one short game on a local Ray cluster
with vLLM and DeepSpeed."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from apo_ray.aapa import (
    anchor_reward,
    anchored_rewards,
    base_weight,
    discriminator_loss,
    expert_probability,
    held_out_accuracy,
    held_out_split,
)
from apo_ray.config import ConfigError, load_config
from apo_ray.metrics import read_metrics_jsonl
from apo_ray.placement import actor_plan
from tests.conftest import REPO_ROOT, SMALL_EVAL

LN2 = math.log(2.0)
SOFTPLUS_MINUS_2 = math.log(1.0 + math.exp(-2.0))  # 0.126928


def test_discriminator_loss_by_hand():
    # expert logits 0 and 2: softplus(-0) = ln 2, softplus(-2) = 0.126928 -> mean 0.410038
    # policy logit 0: softplus(0) = ln 2; balanced: (0.410038 + 0.693147) / 2
    loss, stats = discriminator_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(((LN2 + SOFTPLUS_MINUS_2) / 2 + LN2) / 2, abs=1e-6)
    # accuracy at D = 1/2: expert [no, yes] = 0.5, policy [no] = 0 -> 0.25
    assert stats["aapa/disc_acc"] == pytest.approx(0.25)
    assert stats["aapa/disc_loss"] == pytest.approx(loss.item())


def test_discriminator_loss_with_one_side_of_a_minibatch_and_its_gradient_direction():
    only_policy, _ = discriminator_loss(torch.tensor([]), torch.tensor([2.0]))
    assert only_policy.item() == pytest.approx(math.log(1.0 + math.exp(2.0)), abs=1e-6)
    expert, policy = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    discriminator_loss(expert, policy)[0].backward()
    # Descending the loss raises expert logits and lowers policy ones.
    assert (expert.grad < 0).all() and (policy.grad > 0).all()
    with pytest.raises(ValueError, match="no expert and no policy logits"):
        discriminator_loss(torch.tensor([]), torch.tensor([]))


def test_anchor_reward_and_expert_probability_by_hand():
    # log D = -softplus(-d): d = 0 -> -ln 2; d = 2 -> -0.126928; d = -3 -> -ln(1 + e^3) = -3.048587
    assert anchor_reward([0.0, 2.0, -3.0], "log_prob").tolist() == pytest.approx(
        [-LN2, -SOFTPLUS_MINUS_2, -math.log(1.0 + math.exp(3.0))], abs=1e-9
    )
    assert anchor_reward([0.5, -1.5], "logit").tolist() == [0.5, -1.5]
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4; no overflow far out
    assert expert_probability([0.0, math.log(3.0), -1000.0]).tolist() == pytest.approx([0.5, 0.75, 0.0])
    with pytest.raises(ValueError, match="aapa.reward"):
        anchor_reward([0.0], "hinge")


def test_staged_schedule_and_the_weighted_sum():
    assert [base_weight(r, 2) for r in (1, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert base_weight(1, 0) == 1.0
    with pytest.raises(ValueError, match="from round 1"):
        base_weight(0, 2)
    # 1 * [1.0, -0.5] + 0.5 * [-0.7, -0.1] = [0.65, -0.55]; anchor-only: 0.5 * anchor = [-0.35, -0.05]
    assert anchored_rewards([1.0, -0.5], [-0.7, -0.1], base=1.0, coef=0.5) == pytest.approx([0.65, -0.55])
    assert anchored_rewards([1.0, -0.5], [-0.7, -0.1], base=0.0, coef=0.5) == pytest.approx([-0.35, -0.05])
    with pytest.raises(ValueError, match="lengths differ"):
        anchored_rewards([1.0], [0.0, 0.0], base=1.0, coef=1.0)


def test_held_out_split_is_seeded_disjoint_and_never_empty_on_either_side():
    fitted, held = held_out_split(10, 0.2, seed=7)
    assert len(held) == 2 and sorted(fitted + held) == list(range(10))
    assert held_out_split(10, 0.2, seed=7) == (fitted, held)
    assert len(held_out_split(3, 0.01, seed=0)[1]) == 1  # a positive share holds out at least one
    assert len(held_out_split(2, 0.9, seed=0)[0]) == 1  # and leaves at least one to fit on
    assert held_out_split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


def test_held_out_accuracy_by_hand():
    # prompt 3: expert 1.0 vs samples 0.0 (win), 2.0 (loss), 1.0 (tie); prompt 5: expert 0.0 vs -1.0 (win)
    accuracy, stderr = held_out_accuracy({3: 1.0, 5: 0.0}, [0.0, 2.0, 1.0, -1.0], [3, 3, 3, 5])
    assert accuracy == pytest.approx(2.5 / 4)
    # clustered by prompt: sums 1.5 (3 pairs) and 1.0 (1 pair), m = 0.625;
    # sqrt(2 * ((1.5 - 1.875)^2 + (1 - 0.625)^2)) / 4
    assert stderr == pytest.approx(math.sqrt(2 * (0.375**2 + 0.375**2)) / 4)


def test_aapa_config_keys(caplog):
    config = REPO_ROOT / "configs/aapa_grpo.yaml"
    cfg = load_config(config)
    assert cfg.aapa.enabled and "discriminator" in [role.name for role in actor_plan(cfg)]
    # The baseline from the same file: the aapa keys are named in a warning, not refused, and not saved.
    with caplog.at_level(logging.WARNING, logger="apo_ray.config"):
        baseline = load_config(config, ["aapa.enabled=false"])
    assert "aapa.coef" in caplog.text and "discriminator" not in [role.name for role in actor_plan(baseline)]
    assert "coef" not in baseline.to_dict()["aapa"]
    with pytest.raises(ConfigError, match=r"^aapa.coef: must be >= 0"):
        load_config(config, ["aapa.coef=-1"])
    with pytest.raises(ConfigError, match=r"^aapa.anchor_rounds: unknown key"):
        load_config(config, ["aapa.anchor_rounds=2"])
    with pytest.raises(ConfigError, match=r"^aapa.discriminator_path: path does not exist"):
        load_config(config, ["aapa.discriminator_path=./no/such/model"])
    with pytest.raises(ConfigError, match=r"^apl.enabled: AAPA and APL are separate games"):
        load_config(config, ["apl.enabled=true", "method=dpo"])


def test_the_discriminator_fits_once_tells_expert_from_policy_and_is_frozen(tmp_path):
    """The actor class itself, in-process on the torch engine: the fit separates the two sets, then refuses
    to run again; the saved discriminator reloads frozen with the same scores."""
    from apo_ray.actors.discriminator import Discriminator
    from apo_ray.builtin.models import make_reward_model, make_tokenizer
    from apo_ray.builtin.oracle import TOPICS, format_prompt
    from apo_ray.config import AAPAConfig, LearnerConfig
    from apo_ray.game import GoldAnswer

    make_reward_model(tmp_path / "rm", make_tokenizer())
    prompts = [format_prompt(topic, "rain") for topic in TOPICS[:8]]
    expert = [GoldAnswer(p, "the place is calm and bright") for p in prompts]
    policy = [GoldAnswer(p, "the place is grim and dull") for p in prompts]
    disc = Discriminator(
        str(tmp_path / "rm"),
        aapa=AAPAConfig(lr=3e-3, batch_size=16),
        learner=LearnerConfig(backend="torch", grad_clip=0.0),
    )
    stats = disc.fit(expert, policy, epochs=12, seed=0)
    assert stats["aapa/steps"] == 12.0
    expert_logits = disc.score(prompts, [x.response for x in expert])
    policy_logits = disc.score(prompts, [x.response for x in policy])
    assert min(expert_logits) > 0 > max(policy_logits)
    with pytest.raises(RuntimeError, match="frozen"):
        disc.fit(expert, policy, epochs=1, seed=0)
    assert not any(p.requires_grad for p in disc.model.parameters())
    disc.save(str(tmp_path / "saved"))
    reloaded = Discriminator(str(tmp_path / "rm"), aapa=AAPAConfig(), learner=LearnerConfig(backend="torch"))
    reloaded.load_frozen(str(tmp_path / "saved"))
    assert reloaded.score(prompts, [x.response for x in expert]) == pytest.approx(expert_logits, abs=1e-5)
    with pytest.raises(RuntimeError, match="frozen"):
        reloaded.fit(expert, policy, epochs=1, seed=0)


@pytest.mark.integration
def test_staged_aapa_grpo_rounds_on_vllm_and_deepspeed(ray_cluster, tmp_path):
    """Round 0 fits and freezes the discriminator; round 1 is anchor-only, round 2 RM + anchor."""
    from apo_ray.train import prepare, run

    cfg = load_config(
        REPO_ROOT / "configs/aapa_grpo.yaml",
        [
            "rounds=2",
            "samples_per_prompt=2",
            f"run_dir={tmp_path / 'run'}",
            "data.builtin.n_pairs=64",
            "data.builtin.n_gold=8",
            "data.builtin.n_prompts=16",
            "data.builtin.n_eval_pairs=16",
            "reward.initial_epochs=1",
            "aapa.epochs=1",
            "aapa.anchor_only_rounds=1",
            "ppo.prompts_per_iteration=8",
            "ppo.minibatch_size=8",
            "ppo.ppo_epochs=1",
            "logging.ray_metrics=false",
            *SMALL_EVAL,
        ],
    )
    prepared = prepare(cfg)
    run(prepared)
    rows = read_metrics_jsonl(prepared.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    # The fit: gold answers vs 2 SFT samples per gold prompt, in minibatches of both.
    assert rows[0]["aapa/steps"] >= 1 and 0.0 <= rows[0]["aapa/disc_acc"] <= 1.0
    # 2 of the 8 gold prompts (aapa.held_out_fraction 0.2) were left out of the fit to measure it on: 2 samples each.
    assert rows[0]["aapa/disc_heldout_pairs"] == 4 and 0.0 <= rows[0]["aapa/disc_acc_heldout"] <= 1.0
    assert [rows[1]["aapa/base_weight"], rows[2]["aapa/base_weight"]] == [0.0, 1.0]
    for row in rows[1:]:
        assert 0.0 < row["aapa/disc_score"] < 1.0 and row["aapa/disc_score_se"] > 0.0
        assert row["aapa/anchor_reward"] < 0.0  # log D
        assert "policy/loss" in row
    assert (prepared.run_dir / "checkpoints/discriminator/config.json").is_file()
    assert (prepared.run_dir / "report/aapa_disc_score.png").is_file()
