"""Where a stage is in its data, and which items each rank trains on: pure functions of the seed, the epoch,
the step and the world size, so that a worker group restarted from a checkpoint's cursor feeds every rank
exactly what an uninterrupted run would have fed it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DataCursor:
    epoch: int = 0
    # Optimizer steps done in this epoch, and in the whole run.
    step: int = 0
    global_step: int = 0

    def advance(self, steps_per_epoch: int) -> DataCursor:
        if self.step + 1 >= steps_per_epoch:
            return DataCursor(self.epoch + 1, 0, self.global_step + 1)
        return DataCursor(self.epoch, self.step + 1, self.global_step + 1)

    def finished(self, epochs: int) -> bool:
        return self.epoch >= epochs

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataCursor:
        fields = ("epoch", "step", "global_step")
        if set(values) != set(fields) or not all(isinstance(values[k], int) and values[k] >= 0 for k in fields):
            raise ValueError(f"data cursor: expected non-negative integers {', '.join(fields)}, got {values!r}")
        return cls(**values)


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Full batches per epoch: the remainder (< batch_size items, different ones each epoch) is left out, so
    every step has the same size and every rank the same share."""
    return n_items // batch_size


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_items).tolist()


def rank_batch(order: list[int], step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share of step `step`'s batch: every world_size-th item of it (batch_size divides evenly)."""
    batch = order[step * batch_size : (step + 1) * batch_size]
    return batch[rank::world_size]


def padded_shard(n_items: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Rank `rank`'s items for evaluation and how many of them are real: every rank gets the same count (the
    last ones repeat item 0), because under ZeRO-3 every forward pass is a collective that all ranks join."""
    own = list(range(rank, n_items, world_size))
    width = -(-n_items // world_size)
    return own + [0] * (width - len(own)), len(own)
