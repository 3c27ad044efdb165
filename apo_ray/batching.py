"""The order in which a learner's step visits its items: one plan per kind of step, as lists of minibatches.

Pure and seeded, so a resumed run draws the same minibatches as an uninterrupted one. Every learner runs its
plan through one loop (actors/engine.py `train_steps`); only the plan differs:
- `shuffled_minibatches`: PPO and the critic, fixed-size minibatches of a fresh permutation per epoch;
- `grouped_minibatches`: the offline policy steps, whole groups (RRHF's samples of one prompt) kept together;
- `proportional_minibatches`: the RM step, each minibatch a proportional share of two sets (APO pairs and
  human pairs), so that both terms are seen at every step.

A learner of several ranks walks the same plan on every rank, each rank taking its `rank_share` of every
minibatch (the learner scales its loss by its share of what the loss averages over, so the shares add up to
the minibatch's loss).
"""

from __future__ import annotations

import numpy as np
import torch


def shuffled_minibatches(n_items: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """`epochs` passes over range(n_items), each a fresh permutation cut into `batch_size` pieces."""
    generator = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(epochs):
        order = torch.randperm(n_items, generator=generator).tolist()
        plan += [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
    return plan


def grouped_minibatch_groups(groups: list[list[int]], batch_size: int, epochs: int, seed: int) -> list[list[list[int]]]:
    """`epochs` passes over shuffled `groups`, filling a minibatch with whole groups until it holds at least
    `batch_size` items (the last minibatch of a pass holds what is left); each minibatch as its groups."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(epochs):
        order = rng.permutation(len(groups))
        batch: list[list[int]] = []
        items = 0
        for g in order:
            batch.append(groups[g])
            items += len(groups[g])
            if items >= batch_size or g == order[-1]:
                plan.append(batch)
                batch, items = [], 0
    return plan


def grouped_minibatches(groups: list[list[int]], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """`grouped_minibatch_groups` with each minibatch flattened to its items."""
    return [
        [i for group in batch for i in group] for batch in grouped_minibatch_groups(groups, batch_size, epochs, seed)
    ]


def proportional_minibatches(
    n_first: int, n_second: int, batch_size: int, epochs: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """`epochs` passes in ceil((n_first + n_second) / batch_size) steps, each step a pair (indices of the first
    set, indices of the second) holding an equal share of both shuffled sets; empty steps are dropped."""
    n_steps = max(1, -(-(n_first + n_second) // batch_size))
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(epochs):
        first = np.array_split(rng.permutation(n_first), n_steps)
        second = np.array_split(rng.permutation(n_second), n_steps)
        plan += [(a.tolist(), b.tolist()) for a, b in zip(first, second) if len(a) or len(b)]
    return plan


def rank_slice(units: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s contiguous slice of `units`; slices differ in length by at most one, the longer ones
    first (rank 0 is empty only when `units` is)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
    base, extra = divmod(len(units), world_size)
    start = rank * base + min(rank, extra)
    return units[start : start + base + (rank < extra)]


def rank_share(minibatch, rank: int, world_size: int):
    """Rank `rank`'s part of a plan's minibatch: a slice of a list (of items or of whole groups), or of each
    list of a pair (`proportional_minibatches`), the second sliced from the last rank backwards so that the
    ranks short of one item in the first list are the ones that get the extra in the second."""
    if isinstance(minibatch, tuple):
        first, second = minibatch
        return rank_slice(first, rank, world_size), rank_slice(second, world_size - 1 - rank, world_size)
    return rank_slice(minibatch, rank, world_size)


def is_empty_share(share) -> bool:
    return not any(share) if isinstance(share, tuple) else not share


def fraction(part: float, whole: float) -> float:
    """part / whole, the share of a loss's normaliser a rank holds (0 for an empty whole); exactly 1.0 when a
    single rank holds the whole, so that one rank's loss is unchanged."""
    return part / whole if whole else 0.0


def iteration_prompt_indices(n_prompts: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """The prompts (indices) of PPO iteration (round) `iteration` >= 1: consecutive slices of a stream of seeded
    permutations, one per pass over the prompts. Every prompt is used once per pass, and a resumed run
    draws the same prompts as an uninterrupted one."""
    if n_prompts < 1 or per_iteration < 1 or iteration < 1:
        raise ValueError(
            f"n_prompts, per_iteration, iteration: must be >= 1, got {n_prompts}, {per_iteration}, {iteration}"
        )
    passes: dict[int, np.ndarray] = {}
    indices = []
    for position in range((iteration - 1) * per_iteration, iteration * per_iteration):
        one_pass, offset = divmod(position, n_prompts)
        if one_pass not in passes:
            passes[one_pass] = np.random.default_rng([seed, one_pass]).permutation(n_prompts)
        indices.append(int(passes[one_pass][offset]))
    return indices
