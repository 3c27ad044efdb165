import math

import pytest
import torch

from apo_ray.ppo import (
    AdaptiveKLController,
    FixedKLController,
    discounted_returns,
    entropy_from_logits,
    gae_advantages,
    grpo_advantages,
    kl_limited_loss,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_plus_plus_advantages,
    whiten,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_estimators_by_hand():
    logp = t([math.log(0.5), math.log(0.25)])
    ref_logp = t([math.log(0.25), math.log(0.5)])
    # k1 = log(pi / ref): +log 2 then -log 2
    assert kl_penalty(logp, ref_logp, "k1").tolist() == pytest.approx([math.log(2), -math.log(2)])
    # k3 = (r - 1) - log r, r = ref / pi: r = 1/2 -> -0.5 + log 2; r = 2 -> 1 - log 2 (never negative)
    assert kl_penalty(logp, ref_logp, "k3").tolist() == pytest.approx([0.1931471805599453, 0.3068528194400547])
    assert kl_penalty(logp, logp, "k3").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref_logp, "k2")


def test_per_token_rewards_puts_score_on_last_real_token():
    score = t([1.0, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = per_token_rewards(score, kl, mask, kl_coef=0.5)
    assert rewards.tolist()[0] == pytest.approx([-0.05, -0.1, -0.15 + 1.0])
    assert rewards.tolist()[1] == pytest.approx([-0.2, -0.25 + 2.0, 0.0])


def test_per_token_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match="no response token"):
        per_token_rewards(t([1.0]), t([[0.0, 0.0]]), torch.tensor([[0, 0]]), kl_coef=0.1)


def test_gae_three_steps_with_padding():
    # Row 0: rewards [0, 0, 1], values [0.5, 0.4, 0.3], then one padded step holding garbage.
    # gamma = 0.9, lambda = 0.8 (gamma * lambda = 0.72):
    #   d2 = 1 - 0.3 = 0.7                     A2 = 0.7
    #   d1 = 0.9 * 0.3 - 0.4 = -0.13           A1 = -0.13 + 0.72 * 0.7 = 0.374
    #   d0 = 0.9 * 0.4 - 0.5 = -0.14           A0 = -0.14 + 0.72 * 0.374 = 0.12928
    # Row 1: a single token, reward 2, value 0.5: A = 1.5, return 2.
    rewards = t([[0.0, 0.0, 1.0, 5.0], [2.0, 9.0, 9.0, 9.0]])
    values = t([[0.5, 0.4, 0.3, 7.0], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == pytest.approx([0.12928, 0.374, 0.7, 0.0])
    assert returns[0].tolist() == pytest.approx([0.62928, 0.774, 1.0, 0.0])
    assert advantages[1].tolist() == pytest.approx([1.5, 0.0, 0.0, 0.0])
    assert returns[1].tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])


def test_whiten_over_real_tokens_only():
    # real values 1, 2, 3, 5: mean 2.75, population variance 8.75 / 4 = 2.1875
    x = t([[1.0, 2.0, 3.0], [5.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = [-1.1832159566199232, -0.50709255283711, 0.1690308509457033, 1.52127765851133]
    out = whiten(x, mask)
    assert out[0].tolist() == pytest.approx(expected[:3])
    assert out[1].tolist() == pytest.approx([expected[3], 0.0, 0.0])
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0].tolist() == pytest.approx([v + 2.75 for v in expected[:3]])
    with pytest.raises(ValueError, match="no real token"):
        whiten(x, torch.zeros(2, 3))


def test_ppo_policy_loss_clipping_branches():
    clip = 0.2
    # (A, ratio): (+1, 1.5) above the clip -> clipped; (+1, 0.5) below -> unclipped (pessimistic);
    # (-1, 1.5) -> unclipped; (-1, 0.5) -> clipped; (+1, 1.1) inside the range; last token is padding.
    advantages = t([[1.0, 1.0, -1.0, -1.0, 1.0, 100.0]])
    ratios = t([[1.5, 0.5, 1.5, 0.5, 1.1, 10.0]])
    old_logp = torch.zeros(1, 6, dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, old_logp, advantages, mask, clip)
    # per token max(-A r, -A clip(r)): -1.2, -0.5, 1.5, 0.8, -1.1 -> mean -0.1
    assert loss.item() == pytest.approx(-0.1)
    assert clipfrac == pytest.approx(2 / 5)
    logs = [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), math.log(1.1)]
    assert approx_kl == pytest.approx(0.5 * sum(v * v for v in logs) / 5)
    loss.backward()
    # d/dlogp of -A * r is -A * r on unclipped tokens, 0 on clipped ones, over 5 real tokens.
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5 / 5, 1.5 / 5, 0.0, -1.1 / 5, 0.0])


def test_ppo_value_loss_clipping_branches():
    old_values = t([[0.0, 0.0, 0.0, 0.0]])
    values = t([[0.5, 0.5, 0.1, 50.0]]).requires_grad_()
    returns = t([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # token 0: unclipped 0.25, clipped (0.2 - 1)^2 = 0.64 -> 0.64 (clipped)
    # token 1: unclipped 0.25, clipped 0.04 -> 0.25; token 2: inside the range, 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81) / 3)
    assert clipfrac == pytest.approx(1 / 3)
    loss.backward()
    # only unclipped tokens move the value: 0.5 * 2 (v - R) / 3
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5 / 3, -0.9 / 3, 0.0])


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # H(1/2, 1/2) = log 2; H(3/4, 1/4) = 0.5623351446188083
    assert entropy_from_logits(logits, mask).item() == pytest.approx((math.log(2) + 0.5623351446188083) / 2)


def test_grpo_advantages_normalise_within_groups():
    scores = t([1.0, 2.0, 3.0, 10.0, 10.0, 5.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    adv = grpo_advantages(scores, groups, eps=1e-6)
    # group 0: mean 2, sample std 1; group 1: no spread; group 2: alone; group 3: mean 2, std 2*sqrt(2)
    expected = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def test_reinforce_plus_plus_returns_and_batch_whitening():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5: row 0 -> [0.25, 0.5, 1]; row 1 -> [1, 2, pad]
    returns = discounted_returns(rewards, mask, gamma=0.5)
    assert returns[0].tolist() == pytest.approx([0.25, 0.5, 1.0])
    assert returns[1].tolist() == pytest.approx([1.0, 2.0, 0.0])
    # over the 5 real tokens: mean 0.95, population std 0.6
    adv = reinforce_plus_plus_advantages(rewards, mask, gamma=0.5)
    expected = [[-0.7 / 0.6, -0.45 / 0.6, 0.05 / 0.6], [0.05 / 0.6, 1.05 / 0.6, 0.0]]
    assert adv[0].tolist() == pytest.approx(expected[0], abs=1e-6)
    assert adv[1].tolist() == pytest.approx(expected[1], abs=1e-6)


def test_adaptive_kl_moves_towards_target():
    controller = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=1000)  # error +1 clipped to +0.2 -> x1.02
    assert controller.value == pytest.approx(0.102)
    controller.update(current_kl=3.0, n_steps=1000)  # error -0.5 clipped to -0.2 -> x0.98
    assert controller.value == pytest.approx(0.102 * 0.98)
    before = controller.value
    controller.update(current_kl=6.6, n_steps=1000)  # error +0.1 -> x1.01
    assert controller.value == pytest.approx(before * 1.01)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(init_value=0.1, target=0.0, horizon=10)


def test_fixed_kl_stays_put():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.value == 0.05


def test_kl_limited_loss_is_ppos_under_the_limit_and_pulls_back_at_it():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]))
    # the policy puts twice the reference's probability on every sampled token: k1 = log 2 per token,
    # sequence KL = (2 log 2 + 3 log 2) / 2 rows = 2.5 log 2 = 1.733 (samples of this very policy: ratio 1)
    logp = (ref + math.log(2.0)).requires_grad_()
    old = logp.detach()
    ppo_loss = torch.tensor(0.123)

    loss, sequence_kl, limited = kl_limited_loss(ppo_loss, logp, old, ref, mask, kl_limit=2.0)
    assert sequence_kl == pytest.approx(2.5 * math.log(2.0)) and not limited and loss is ppo_loss
    # drawn by a policy that gave these tokens half the current probability: every token weighs twice
    _, reweighted, _ = kl_limited_loss(ppo_loss, logp, old - math.log(2.0), ref, mask, kl_limit=2.0)
    assert reweighted == pytest.approx(2 * sequence_kl)

    loss, sequence_kl, limited = kl_limited_loss(ppo_loss, logp, old, ref, mask, kl_limit=1.5)
    assert limited
    # k3 per token with r = ref/pi = 1/2: (r - 1) - log r = -0.5 + log 2, the same on all 5 real tokens
    assert loss.item() == pytest.approx(-0.5 + math.log(2.0))
    loss.backward()
    # d k3 / d logp = 1 - r = 0.5 per token, over 5 tokens: descent lowers logp toward the reference
    assert torch.allclose(logp.grad, mask * 0.5 / 5)
