import math

import pytest
import torch

from apo_ray.losses import (
    apo_reward_loss,
    bradley_terry_loss,
    dpo_loss,
    masked_mean,
    rrhf_loss,
    score_difference_loss,
    sequence_logprob,
    sft_loss,
    token_logprobs,
)

LOG2 = math.log(2.0)
NEG_LOGSIG_1 = 0.31326168751822286  # -log sigmoid(1) = log(1 + e^-1)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_bradley_terry_hand_values():
    # pairs: margin 1 -> log(1 + e^-1); margin 0 -> log 2
    loss = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0))
    assert loss.item() == pytest.approx((NEG_LOGSIG_1 + LOG2) / 2)


def test_score_difference_is_mean_of_loser_minus_winner():
    # (1 - 3 + 2 - 1) / 2 = -0.5
    assert score_difference_loss(t(3.0, 1.0), t(1.0, 2.0)).item() == pytest.approx(-0.5)


def _game_scores():
    return dict(r_gold=t(1.0), r_sample=t(0.0), r_chosen=t(0.0, 2.0), r_rejected=t(0.0, 1.0))


def test_apo_reward_loss_bt_combines_both_terms():
    loss, stats = apo_reward_loss(**_game_scores(), apo_coef=0.5, pref_coef=2.0, kind="bt")
    pref = (LOG2 + NEG_LOGSIG_1) / 2  # margins 0 and 1
    assert loss.item() == pytest.approx(0.5 * NEG_LOGSIG_1 + 2.0 * pref)
    assert stats["rm/loss"] == pytest.approx(1.1630397118372797)
    assert stats["rm/loss_apo"] == pytest.approx(NEG_LOGSIG_1)
    assert stats["rm/loss_pref"] == pytest.approx(pref)
    assert stats["rm/margin_apo"] == pytest.approx(1.0)
    assert stats["rm/margin"] == pytest.approx(0.5)
    # one tie (half) and one correct pair
    assert stats["rm/acc_train_pref"] == pytest.approx(0.75)
    # the APO part of the loss: 0.5 * NEG_LOGSIG_1 of 0.5 * NEG_LOGSIG_1 + 2 * pref
    assert stats["rm/apo_share"] == pytest.approx(0.5 * NEG_LOGSIG_1 / (0.5 * NEG_LOGSIG_1 + 2.0 * pref))


def test_apo_reward_loss_diff_changes_only_the_apo_term():
    loss, stats = apo_reward_loss(**_game_scores(), apo_coef=0.5, pref_coef=2.0, kind="diff")
    # APO term: 0 - 1 = -1; the human term stays Bradley-Terry.
    assert stats["rm/loss_apo"] == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(0.5 * -1.0 + 2.0 * (LOG2 + NEG_LOGSIG_1) / 2)
    # a negative APO part still weighs by its size: 0.5 of 0.5 + (LOG2 + NEG_LOGSIG_1)
    assert stats["rm/apo_share"] == pytest.approx(0.5 / (0.5 + LOG2 + NEG_LOGSIG_1))


def test_apo_reward_loss_gradient_raises_gold_and_lowers_sample():
    r_gold = t(0.0, 0.0).requires_grad_()
    r_sample = t(0.0, 0.0).requires_grad_()
    loss, _ = apo_reward_loss(r_gold, r_sample, None, None, apo_coef=0.25, pref_coef=1.0, kind="diff")
    loss.backward()
    # d/d r_gold of 0.25 * mean(r_sample - r_gold) over 2 pairs
    assert r_gold.grad.tolist() == pytest.approx([-0.125, -0.125])
    assert r_sample.grad.tolist() == pytest.approx([0.125, 0.125])


def test_apo_reward_loss_without_human_pairs_is_the_apo_term_alone():
    scores = _game_scores()
    loss, stats = apo_reward_loss(scores["r_gold"], scores["r_sample"], None, None, apo_coef=0.5, pref_coef=2.0)
    assert loss.item() == pytest.approx(0.5 * NEG_LOGSIG_1)
    assert "rm/loss_pref" not in stats and "rm/acc_train_pref" not in stats


def test_apo_reward_loss_without_apo_pairs_is_plain_rm_training():
    scores = _game_scores()
    empty = torch.empty(0, dtype=torch.float64)
    loss, stats = apo_reward_loss(empty, empty, scores["r_chosen"], scores["r_rejected"], apo_coef=0.5, pref_coef=2.0)
    assert loss.item() == pytest.approx(2.0 * (LOG2 + NEG_LOGSIG_1) / 2)
    assert "rm/loss_apo" not in stats


def test_apo_reward_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="nothing to train on"):
        apo_reward_loss(None, None, None, None, apo_coef=1.0, pref_coef=1.0)
    with pytest.raises(ValueError, match="r_gold and r_sample"):
        apo_reward_loss(t(1.0, 2.0), t(0.0), None, None, apo_coef=1.0, pref_coef=1.0)
    with pytest.raises(ValueError, match="kind"):
        apo_reward_loss(**_game_scores(), apo_coef=1.0, pref_coef=1.0, kind="wgan")


def test_token_logprobs_shift_by_one():
    # position 0 logits [0, 0] predict label[1] = 1 with p 1/2; position 1 logits [ln 3, 0] predict
    # label[2] = 0 with p 3/4; the last position predicts nothing.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[1, 1, 0]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx([math.log(0.5), math.log(0.75)], abs=1e-6)


def test_token_logprobs_bfloat16_computed_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    expected = token_logprobs(logits.bfloat16().float(), labels)
    out = token_logprobs(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)


def test_token_logprobs_values_and_gradients_equal_the_full_log_softmax():
    # Gather minus a row's logsumexp, with no [B, T, V] log-softmax: the same numbers and the same gradient.
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 49, requires_grad=True)
    labels = torch.randint(0, 49, (3, 7))
    weights = torch.randn(3, 6)
    plain = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None])[..., 0]
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), logits)
    out = token_logprobs(logits, labels)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    assert torch.allclose(out, plain, atol=1e-6, rtol=0) and torch.allclose(grad, plain_grad, atol=1e-6, rtol=0)


def test_token_logprobs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


def test_masked_mean_overall_per_row_and_empty_row():
    values = t(1.0, 2.0, 3.0, 4.0, 5.0, 6.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(values, torch.zeros(2, 3), dim=1).tolist() == [0.0, 0.0]


def test_sequence_logprob_sum_and_average():
    logps = t(-1.0, -2.0, -9.0, -3.0, -9.0, -9.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_logprob(logps, mask, average=False).tolist() == pytest.approx([-3.0, -3.0])
    assert sequence_logprob(logps, mask, average=True).tolist() == pytest.approx([-1.5, -3.0])


def test_sft_loss_is_token_mean_nll():
    logps = t(-1.0, -2.0, -9.0, -3.0, -9.0, -9.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(logps, mask).item() == pytest.approx(2.0)


def _rrhf_batch():
    # rows a, b (prompt 7) and c, d, e (prompt 3); length-normalised p = [-2, -1, -0.5, -3, -4]
    token_logps = t(-1.0, -3.0, -1.0, -50.0, -0.5, -0.5, -2.0, -4.0, -4.0, -4.0).view(5, 2)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]])
    rewards = t(1.0, 0.0, 2.0, 1.0, 2.0)
    group_ids = torch.tensor([7, 7, 3, 3, 3])
    return token_logps, mask, rewards, group_ids


def test_rrhf_loss_hand_values():
    token_logps, mask, rewards, group_ids = _rrhf_batch()
    loss, stats = rrhf_loss(token_logps, mask, rewards, group_ids, sft_coef=2.0)
    # prompt 7: b worse than a, max(0, -1 - -2) = 1.
    # prompt 3: d worse than c: max(0, -3 - -0.5) = 0; d worse than e: max(0, -3 - -4) = 1; c, e tie.
    # rank = (1 + 1) / 2 groups = 1.
    assert stats["policy/loss_rank"] == pytest.approx(1.0)
    # best of prompt 7 is a (NLL 2); prompt 3 ties c and e, the earlier c wins (NLL 0.5).
    assert stats["policy/loss_sft"] == pytest.approx(1.25)
    assert loss.item() == pytest.approx(1.0 + 2.0 * 1.25)


def test_rrhf_loss_pushes_down_the_worse_response_that_outranks_the_better():
    token_logps, mask, rewards, group_ids = _rrhf_batch()
    token_logps.requires_grad_()
    loss, _ = rrhf_loss(token_logps, mask, rewards, group_ids, sft_coef=0.0)
    loss.backward()
    # b's only real token carries its whole p; hinge slope 1, averaged over 2 groups.
    assert token_logps.grad[1].tolist() == pytest.approx([0.5, 0.0])
    # a is below b in the hinge: raising a's tokens (1/2 each by length normalisation) lowers the loss.
    assert token_logps.grad[0].tolist() == pytest.approx([-0.25, -0.25])


def test_dpo_loss_matches_sigmoid_dpo_by_hand():
    loss, stats = dpo_loss(
        policy_chosen_logps=t(-1.0, -2.0),
        policy_rejected_logps=t(-3.0, -2.0),
        ref_chosen_logps=t(-2.0, -2.0),
        ref_rejected_logps=t(-2.0, -2.0),
        beta=0.1,
    )
    # pair 1: rewards 0.1 and -0.1, loss -log sigmoid(0.2); pair 2: all equal, loss log 2.
    assert loss.item() == pytest.approx((0.5981388693815918 + LOG2) / 2)
    assert stats["policy/rewards_chosen"] == pytest.approx(0.05)
    assert stats["policy/rewards_rejected"] == pytest.approx(-0.05)
    assert stats["policy/rewards_margin"] == pytest.approx(0.1)
    assert stats["policy/rewards_accuracy"] == pytest.approx(0.5)
