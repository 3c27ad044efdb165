"""The method registry (apo_ray/methods/) and IPO, the method added as one file: its loss by hand, its config
derived from its declaration, and the policy learner dispatching to it by name."""

from __future__ import annotations

import math

import pytest
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.config import ConfigError, LearnerConfig, ModelConfig, PolicyConfig, load_config
from apo_ray.game import Rollout
from apo_ray.methods import Method, get_method, method_names, register_method
from tests.test_learner_group import SAMPLES


def test_ipo_loss_by_hand():
    # h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); loss = mean (h - 1/(2 tau))^2.
    #   pair 0: (-3.0 + 3.5) - (-6.0 + 5.0) = 0.5 + 1.0 = 1.5;   tau 0.25 -> target 2.0 -> (1.5 - 2.0)^2 = 0.25
    #   pair 1: (-2.0 + 1.0) - (-4.0 + 4.5) = -1.0 - 0.5 = -1.5;             -> (-1.5 - 2.0)^2 = 12.25
    loss, stats = get_method("ipo").loss(
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-6.0, -4.0]),
        torch.tensor([-3.5, -1.0]),
        torch.tensor([-5.0, -4.5]),
        tau=0.25,
    )
    assert loss.item() == pytest.approx((0.25 + 12.25) / 2)
    assert stats["policy/loss"] == pytest.approx(6.25)
    assert stats["policy/rewards_chosen"] == pytest.approx((0.5 - 1.0) / 2)
    assert stats["policy/rewards_rejected"] == pytest.approx((-1.0 + 0.5) / 2)
    assert stats["policy/rewards_margin"] == pytest.approx(0.0)
    assert stats["policy/rewards_accuracy"] == pytest.approx(0.5)


def test_ipo_gradient_stops_at_the_target_margin_where_dpos_does_not():
    chosen = torch.tensor([0.0], requires_grad=True)
    # A margin of exactly 1/(2 tau) = 5: IPO's square is at its minimum, DPO's logistic loss still pulls.
    ipo, _ = get_method("ipo").loss(chosen, torch.tensor([-5.0]), torch.tensor([0.0]), torch.tensor([0.0]), tau=0.1)
    ipo.backward()
    assert ipo.item() == 0.0 and chosen.grad.item() == 0.0
    chosen.grad = None
    dpo, _ = get_method("dpo").loss(chosen, torch.tensor([-5.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
    dpo.backward()
    assert chosen.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.5))))


def test_ipo_config_validates_with_the_registrys_defaults():
    cfg = load_config(None, ["method=ipo"])
    ipo = get_method("ipo")
    assert cfg.policy.lr == ipo.lr == 1e-4 and cfg.ipo.tau == 0.1 and not cfg.online
    assert cfg.trained_ranks.keys() == {"policy", "reward"}
    assert load_config(None, ["method=ipo", "ipo.tau=0.5"]).ipo.tau == 0.5
    assert ipo.settings(load_config(None, ["method=ipo", "ipo.tau=0.5"])) == {"tau": 0.5}
    # The saved config of an ipo run loads back with its tau.
    from apo_ray.config import config_from_dict

    assert config_from_dict(load_config(None, ["method=ipo", "ipo.tau=0.5"]).to_dict()).ipo.tau == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method=ipo", "samples_per_prompt=1"],
            r"^samples_per_prompt: ipo needs at least 2 samples per prompt: it pairs the best with the worst$",
        ),
        (["method=dpo", "ipo.tau=0.5"], r"^ipo\.tau: read only by method ipo; this run \(method=dpo"),
        (["method=ipo", "ipo.tau=0"], r"^ipo\.tau: must be > 0"),
        (["method=ipo", "ipo.beta=0.1"], r"^ipo\.beta: unknown key"),
        (["method=ipo", "policy.dpo_beta=0.2"], r"^policy\.dpo_beta: read only by method dpo"),
        (["method=ipo_v2"], r"^method: must be one of dpo, ipo, rjs, rrhf, grpo, ppo, reinforce_pp; got 'ipo_v2'$"),
    ],
)
def test_bad_ipo_input_is_refused_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_registry_lists_every_method_once_and_refuses_bad_declarations():
    assert method_names("offline") == ("dpo", "ipo", "rjs", "rrhf")
    assert method_names("online") == ("grpo", "ppo", "reinforce_pp")
    with pytest.raises(ValueError, match=r"^method ipo: registered twice$"):
        register_method(get_method("ipo"))
    with pytest.raises(ValueError, match=r"^method: must be one of dpo, ipo, .*; got 'nope'$"):
        get_method("nope")
    with pytest.raises(ValueError, match=r"an offline method declares batch, loss, select"):
        Method("half", "offline", about="", lr=1e-4)
    with pytest.raises(ValueError, match=r"an online method declares advantages"):
        Method("half", "online", about="", lr=1e-4)
    with pytest.raises(ValueError, match=r"say why it needs 3 samples per prompt"):
        Method("half", "online", about="", lr=1e-4, min_samples_per_prompt=3, advantages=lambda *a, **k: None)


def test_ipo_selects_best_vs_worst_and_skips_ties():
    rollouts = [
        Rollout(prompt_index=p, prompt=f"q{p}", response=f"r{p}{i}", policy_version=0) for p in (0, 1) for i in range(3)
    ]
    scores = [0.1, 0.9, 0.5, 0.3, 0.3, 0.3]
    pairs = get_method("ipo").select(rollouts, scores, load_config(None, ["method=ipo"]))
    assert [(p.chosen.response, p.rejected.response) for p in pairs] == [("r01", "r00")]


@pytest.mark.usefixtures("restored_environment")
def test_the_policy_learners_pair_step_takes_the_named_methods_loss(tiny_lm_dir):
    """One step on two pairs (one minibatch): the reported loss is the named method's, on the learner's own
    sequence log-probs before the step and the reference's given here."""

    def first_step(method: str, settings: dict):
        learner = PolicyLearner(
            tiny_lm_dir,
            model=ModelConfig(),
            policy=PolicyConfig(batch_size=4, lr=1e-3),
            learner=LearnerConfig(backend="torch"),
            seed=0,
        )
        chosen, rejected = SAMPLES[:2], SAMPLES[2:4]
        own_chosen, own_rejected = learner.sequence_logprobs(chosen), learner.sequence_logprobs(rejected)
        # Each pair's log-ratio margin is 0.3 + 0.2 = 0.5.
        ref_chosen, ref_rejected = [x - 0.3 for x in own_chosen], [x + 0.2 for x in own_rejected]
        return learner.pair_step(
            chosen, rejected, ref_chosen, ref_rejected, method=method, settings=settings, epochs=1, seed=0
        )

    ipo = first_step("ipo", {"tau": 0.1})
    assert ipo["policy/loss"] == pytest.approx((0.5 - 5.0) ** 2, rel=1e-4)
    assert ipo["policy/rewards_margin"] == pytest.approx(0.5, abs=1e-4)
    dpo = first_step("dpo", {"beta": 0.1})
    assert dpo["policy/loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-0.05))), rel=1e-4)
