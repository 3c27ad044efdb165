import pytest

from apo_ray.game import (
    GoldAnswer,
    PreferencePair,
    Rollout,
    RolloutPair,
    assign_shards,
    best_and_worst,
    best_of_n,
    build_apo_pairs,
    group_by_prompt,
    policy_version_lag,
)

GOLD = [GoldAnswer("p0", "g0"), GoldAnswer("p1", "g1")]


def rollout(index, response, version=0):
    return Rollout(prompt_index=index, prompt=f"p{index}", response=response, policy_version=version)


def test_build_apo_pairs_gold_against_each_sample():
    rollouts = [rollout(0, "s0a"), rollout(1, "s1a"), rollout(0, "s0b"), rollout(0, " g0\n")]
    assert build_apo_pairs(GOLD, rollouts) == [
        PreferencePair("p0", "g0", "s0a"),
        PreferencePair("p1", "g1", "s1a"),
        PreferencePair("p0", "g0", "s0b"),
        # the sample that reproduces the gold text gives no pair
    ]


@pytest.mark.parametrize("index", [2, -1])
def test_build_apo_pairs_rejects_rollout_without_gold(index):
    bad = Rollout(prompt_index=index, prompt="p?", response="s", policy_version=0)
    with pytest.raises(ValueError, match=r"rollouts\[1\]\.prompt_index"):
        build_apo_pairs(GOLD, [rollout(0, "s"), bad])


def test_build_apo_pairs_rejects_prompt_mismatch():
    bad = Rollout(prompt_index=1, prompt="p0", response="s", policy_version=0)
    with pytest.raises(ValueError, match=r"rollouts\[0\]\.prompt"):
        build_apo_pairs(GOLD, [bad])


def test_group_by_prompt_keeps_order_and_checks_lengths():
    rollouts = [rollout(1, "a"), rollout(0, "b"), rollout(1, "c")]
    groups = group_by_prompt(rollouts, [0.5, 1.5, 2.5])
    assert list(groups) == [1, 0]
    assert [(r.response, s) for r, s in groups[1]] == [("a", 0.5), ("c", 2.5)]
    with pytest.raises(ValueError, match="lengths differ"):
        group_by_prompt(rollouts, [1.0])


def test_best_of_n_breaks_ties_by_earliest_sample():
    rollouts = [rollout(0, "low"), rollout(0, "first-best"), rollout(1, "only"), rollout(0, "second-best")]
    best = best_of_n(rollouts, [1.0, 3.0, -2.0, 3.0])
    assert [r.response for r in best] == ["first-best", "only"]


def test_best_and_worst_margin_filter():
    rollouts = [
        rollout(0, "a1"),
        rollout(0, "a5"),
        rollout(0, "a2"),  # gap 4
        rollout(1, "b2"),
        rollout(1, "b25"),  # gap 0.5
        rollout(2, "c"),  # one sample
        rollout(3, "d"),
        rollout(3, "d'"),  # gap 0
    ]
    scores = [1.0, 5.0, 2.0, 2.0, 2.5, 9.0, 3.0, 3.0]
    assert best_and_worst(rollouts, scores) == [
        RolloutPair(rollouts[1], rollouts[0]),
        RolloutPair(rollouts[4], rollouts[3]),
    ]
    assert best_and_worst(rollouts, scores, min_margin=0.5) == [RolloutPair(rollouts[1], rollouts[0])]
    with pytest.raises(ValueError, match="min_margin"):
        best_and_worst(rollouts, scores, min_margin=-1.0)


def test_assign_shards_contiguous_and_balanced():
    assert assign_shards(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert assign_shards(2, 4) == [[0], [1], [], []]


@pytest.mark.parametrize("n_items", [0, 1, 7, 64, 101])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_assign_shards_covers_every_index_once(n_items, n_workers):
    shards = assign_shards(n_items, n_workers)
    assert len(shards) == n_workers
    assert [i for shard in shards for i in shard] == list(range(n_items))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_assign_shards_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_workers"):
        assign_shards(5, 0)
    with pytest.raises(ValueError, match="n_items"):
        assign_shards(-1, 2)


def test_policy_version_lag():
    rollouts = [rollout(0, "a", version=3), rollout(0, "b", version=5), rollout(1, "c", version=5)]
    stats = policy_version_lag(rollouts, current_version=5)
    assert stats == pytest.approx({"rollout/policy_version_lag": 2 / 3, "rollout/policy_version_lag_max": 2.0})
    with pytest.raises(ValueError, match="above the current version"):
        policy_version_lag(rollouts, current_version=4)
    with pytest.raises(ValueError, match="empty"):
        policy_version_lag([], current_version=0)
