"""The data cursor of the sft/rm stages: resuming from any cursor replays exactly the uninterrupted order."""

from __future__ import annotations

import pytest

from apo_ray.stages.cursor import DataCursor, epoch_order, padded_shard, rank_batch, steps_per_epoch


def schedule(n_items, batch_size, epochs, seed, world_size, start=DataCursor(), stop_after=None):
    """(global step, rank, items) of every step from `start` on, as a worker group trains."""
    per_epoch = steps_per_epoch(n_items, batch_size)
    cursor, out = start, []
    while not cursor.finished(epochs) and (stop_after is None or cursor.global_step < stop_after):
        order = epoch_order(n_items, seed, cursor.epoch)
        for rank in range(world_size):
            out.append((cursor.global_step, rank, rank_batch(order, cursor.step, batch_size, rank, world_size)))
        cursor = cursor.advance(per_epoch)
    return out, cursor


def test_resuming_at_any_step_continues_the_uninterrupted_schedule():
    full, end = schedule(23, 4, epochs=3, seed=7, world_size=2)
    assert end == DataCursor(epoch=3, step=0, global_step=15)  # 5 full batches of 4 per epoch, 3 left over
    for k in range(16):
        head, cursor = schedule(23, 4, 3, 7, 2, stop_after=k)
        # Through a checkpoint: the cursor survives its JSON round trip.
        tail, _ = schedule(23, 4, 3, 7, 2, start=DataCursor.from_dict(cursor.to_dict()))
        assert head + tail == full


def test_ranks_split_each_batch_without_overlap_and_epochs_reshuffle():
    order = epoch_order(40, seed=1, epoch=0)
    shares = [rank_batch(order, 2, 8, rank, 4) for rank in range(4)]
    assert sorted(i for share in shares for i in share) == sorted(order[16:24])
    assert all(len(share) == 2 for share in shares)
    assert epoch_order(40, 1, 0) == order and epoch_order(40, 1, 1) != order and epoch_order(40, 2, 0) != order
    # One worker sees the same batch as four together.
    assert sorted(rank_batch(order, 2, 8, 0, 1)) == sorted(order[16:24])


def test_steps_per_epoch_drops_the_remainder():
    assert steps_per_epoch(1512, 16) == 94
    assert steps_per_epoch(15, 16) == 0


def test_padded_shards_have_equal_length_and_cover_every_item_once():
    for n, world in ((10, 3), (2, 4), (9, 3), (1, 1)):
        shards = [padded_shard(n, rank, world) for rank in range(world)]
        assert len({len(indices) for indices, _ in shards}) == 1
        real = sorted(i for indices, n_real in shards for i in indices[:n_real])
        assert real == list(range(n))


@pytest.mark.parametrize(
    "bad", [{"epoch": 1}, {"epoch": -1, "step": 0, "global_step": 0}, {"epoch": 0, "step": "1", "global_step": 1}]
)
def test_a_damaged_cursor_is_refused(bad):
    with pytest.raises(ValueError, match="data cursor"):
        DataCursor.from_dict(bad)
