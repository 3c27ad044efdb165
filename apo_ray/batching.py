"""The order in which a learner's step visits its items: one plan per kind of step, as lists of minibatches.

Pure and seeded, so a resumed run draws the same minibatches as an uninterrupted one. Every learner runs its
plan through one loop (actors/engine.py `train_steps`); only the plan differs:
- `shuffled_minibatches`: PPO and the critic, fixed-size minibatches of a fresh permutation per epoch;
- `grouped_minibatches`: the offline policy steps, whole groups (RRHF's samples of one prompt) kept together;
- `proportional_minibatches`: the RM step, each minibatch a proportional share of two sets (APO pairs and
  human pairs), so that both terms are seen at every step.
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


def grouped_minibatches(groups: list[list[int]], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """`epochs` passes over shuffled `groups`, filling a minibatch with whole groups until it holds at least
    `batch_size` items (the last minibatch of a pass holds what is left)."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(epochs):
        order = rng.permutation(len(groups))
        batch: list[int] = []
        for g in order:
            batch.extend(groups[g])
            if len(batch) >= batch_size or g == order[-1]:
                plan.append(batch)
                batch = []
    return plan


def proportional_minibatches(n_first: int, n_second: int, batch_size: int, epochs: int,
                             seed: int) -> list[tuple[list[int], list[int]]]:
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
