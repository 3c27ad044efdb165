"""How a learner of several ranks shares each minibatch of its plan (apo_ray.batching): every item on exactly one
rank, whole groups kept together, shares within one item of each other, and the loss parts adding up to the
minibatch's loss. Pure functions, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from apo_ray.batching import (
    fraction,
    grouped_minibatch_groups,
    grouped_minibatches,
    is_empty_share,
    proportional_minibatches,
    rank_share,
    rank_slice,
)
from apo_ray.game import TokenSample
from apo_ray.losses import apo_reward_loss, combine_share_stats, masked_mean, minibatch_stats
from apo_ray.modeling import encode_samples, predicted_response_tokens


def test_a_slice_per_rank_longer_ones_first():
    items = list(range(7))
    assert [rank_slice(items, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [rank_slice(items, r, 1) for r in range(1)] == [items]
    # Fewer items than ranks: the last ranks get nothing, rank 0 always something.
    assert [rank_slice([9], r, 2) for r in range(2)] == [[9], []]
    with pytest.raises(ValueError, match=r"rank: must be in \[0, 2\), got 2"):
        rank_slice(items, 2, 2)


def test_a_pair_of_lists_is_balanced_over_the_ranks():
    # 3 APO + 3 human pairs on 2 ranks: rank 0 takes the longer slice of the first and the shorter of the second.
    shares = [rank_share(([0, 1, 2], [10, 11, 12]), r, 2) for r in range(2)]
    assert shares == [([0, 1], [12]), ([2], [10, 11])]
    assert is_empty_share(([], [])) and not is_empty_share(([], [3])) and is_empty_share([])


def test_groups_stay_whole_and_the_flat_plan_is_the_grouped_one():
    groups = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    grouped = grouped_minibatch_groups(groups, batch_size=4, epochs=2, seed=3)
    assert grouped_minibatches(groups, batch_size=4, epochs=2, seed=3) == [
        [i for group in batch for i in group] for batch in grouped
    ]
    for batch in grouped:
        shares = [rank_share(batch, r, 2) for r in range(2)]
        assert [g for share in shares for g in share] == batch
        assert all(group in groups for share in shares for group in share)


def test_every_item_of_every_step_lands_on_one_rank():
    for plan in (proportional_minibatches(5, 7, batch_size=4, epochs=2, seed=1),):
        for step in plan:
            shares = [rank_share(step, r, 3) for r in range(3)]
            assert sorted(i for share in shares for i in share[0]) == sorted(step[0])
            assert sorted(i for share in shares for i in share[1]) == sorted(step[1])
            sizes = [len(a) + len(b) for a, b in shares]
            assert max(sizes) - min(sizes) <= 1


def test_the_fractions_of_one_rank_are_exactly_one():
    assert fraction(7, 7) == 1.0 and fraction(3, 12) == 0.25 and fraction(0, 0) == 0.0


def test_token_parts_add_up_to_the_minibatch_token_mean():
    # A token mean over a minibatch of rows with 1, 2 and 4 real tokens, shared over 2 ranks (rows [0, 1] and [2]):
    # each rank's mean scaled by its fraction of the tokens sums to the whole mean, unlike the mean of the means.
    values = torch.tensor([[1.0, 0, 0, 0], [2.0, 4.0, 0, 0], [3.0, 3.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    whole = masked_mean(values, mask)
    assert whole.item() == pytest.approx(23 / 7)
    parts = [
        masked_mean(values[rows], mask[rows]) * fraction(mask[rows].sum().item(), mask.sum().item())
        for rows in ([0, 1], [2])
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(23 / 7)
    assert (
        (masked_mean(values[[0, 1]], mask[[0, 1]]) + masked_mean(values[[2]], mask[[2]])) / 2
    ).item() != pytest.approx(23 / 7)


# The APO term's "diff" losses are r_sample - r_gold: gaps 1, 2, 3 give -1, -2, -3; the human term stays
# Bradley-Terry: -log sigmoid(4) for the one human pair's gap of 4.
HUMAN_BT = math.log1p(math.exp(-4.0))


@pytest.mark.parametrize(
    "normalization, whole",
    [
        ("per_term", 0.5 * -2.0 + 2.0 * HUMAN_BT),
        ("pooled", (0.5 * -6.0 + 2.0 * HUMAN_BT) / 4),
    ],
)
def test_rm_shares_add_up_to_the_minibatch_loss(normalization, whole):
    gold, sample = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    chosen, rejected = torch.tensor([4.0]), torch.zeros(1)
    options = dict(apo_coef=0.5, pref_coef=2.0, kind="diff", normalization=normalization)
    whole_stats = apo_reward_loss(gold, sample, chosen, rejected, **options)[1]
    assert apo_reward_loss(gold, sample, chosen, rejected, **options)[0].item() == pytest.approx(whole)
    # Rank 0: APO pairs 0 and 1, no human pair; rank 1: APO pair 2 and the human pair.
    part0, stats0 = apo_reward_loss(gold[:2], sample[:2], None, None, minibatch_pairs=(3, 1), **options)
    part1, stats1 = apo_reward_loss(gold[2:], sample[2:], chosen, rejected, minibatch_pairs=(3, 1), **options)
    assert (part0 + part1).item() == pytest.approx(whole)
    # The APO term's share of the loss is the minibatch's, not a mean of the shares' (rank 0's alone would be 1).
    step = minibatch_stats(combine_share_stats([stats0, stats1]))
    assert step["rm/apo_share"] == pytest.approx(whole_stats["rm/apo_share"]) and "rm/apo_part" not in step
    # So are its means: the APO loss over pairs 0-2 is -2 (rank 0's -1.5 and rank 1's -3 average to -2.25).
    for key in ("rm/loss_apo", "rm/margin_apo", "rm/loss_pref", "rm/margin", "rm/acc_train_pref"):
        assert step[key] == pytest.approx(whole_stats[key]), key
    assert step["rm/loss_apo"] == pytest.approx(-2.0) and not any(key.endswith("_part") for key in step)
    # The stats describe the pairs given, whatever they are a share of: 0.5 x their mean gap -1.5 either way.
    assert stats0["rm/loss"] == pytest.approx(-0.75)
    # Given the whole minibatch's counts, the whole minibatch's loss is unchanged.
    assert apo_reward_loss(gold, sample, chosen, rejected, minibatch_pairs=(3, 1), **options)[
        0
    ].item() == pytest.approx(whole)


@pytest.mark.parametrize(
    "sample, predicted",
    [
        (TokenSample((5, 6), (7, 8, 9)), 3),
        # Nothing before the first response token: it is not predicted.
        (TokenSample((), (7, 8, 9)), 2),
    ],
)
def test_predicted_response_tokens_are_those_the_mask_counts(sample, predicted):
    assert predicted_response_tokens(sample) == predicted
    assert encode_samples([sample], pad_token_id=0).response_mask[:, 1:].sum().item() == predicted
