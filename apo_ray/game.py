"""Bookkeeping of the APO game in pure python: what a rollout is, and how rollouts and their scores
become training pairs for the reward model (gold vs sample) and the policy (best-of-n, best vs worst).

Scores travel as a list parallel to the rollouts rather than inside them: the same rollouts are scored
by several reward models (the game's RM, the evaluation RM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class GoldAnswer:
    prompt: str
    response: str


class TokenSample(NamedTuple):
    """What a causal-LM learner trains on: the prompt ids the sampler read and the response ids it wrote,
    special tokens included. A response that stopped on EOS ends with it; one cut at the length limit
    does not (no EOS is ever added)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Rollout:
    """One policy sample. `prompt_index` indexes the prompt list it was drawn for; `policy_version`
    is the weights version of the rollout worker that produced it.

    The token fields are the sample itself; `response` is its decoded text, for logs, the gold oracle and
    reward models with another tokenizer. `sampler_logprobs[j]` is the sampling engine's log-prob of
    `response_token_ids[j]` (raw logits, before temperature or top-p). `adapter_version`: the version of the LoRA
    adapter the engine served it with (learner.lora.sync 'adapter'; 0 before the first sync), read from the engine,
    which equals `policy_version` unless a sync did not reach it; None where syncs send whole weights."""

    prompt_index: int
    prompt: str
    response: str
    policy_version: int
    worker: int = -1
    prompt_token_ids: tuple[int, ...] = ()
    response_token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason = "stop"
    sampler_logprobs: tuple[float, ...] = ()
    adapter_version: int | None = None

    @property
    def tokens(self) -> TokenSample:
        return TokenSample(self.prompt_token_ids, self.response_token_ids)


@dataclass(frozen=True)
class RolloutPair:
    """A DPO pair drawn from the policy's own samples: the RM's best and worst of one prompt."""

    chosen: Rollout
    rejected: Rollout


def build_apo_pairs(gold: Sequence[GoldAnswer], rollouts: Sequence[Rollout]) -> list[PreferencePair]:
    """D_APO: one pair per policy sample, the gold response of its prompt as chosen, the sample as
    rejected, in rollout order. Rollouts index `gold` by `prompt_index`.

    A sample whose text equals the gold response (ignoring surrounding whitespace) is skipped: labelling
    the gold text as rejected is false, and the pair gives the RM no gradient anyway (equal inputs get
    equal scores), it only drags the averaged loss towards a constant.
    """
    pairs = []
    for position, rollout in enumerate(rollouts):
        if not 0 <= rollout.prompt_index < len(gold):
            raise ValueError(
                f"rollouts[{position}].prompt_index: {rollout.prompt_index} refers to no gold answer "
                f"({len(gold)} gold answers)"
            )
        answer = gold[rollout.prompt_index]
        if rollout.prompt != answer.prompt:
            raise ValueError(f"rollouts[{position}].prompt: differs from the prompt of gold[{rollout.prompt_index}]")
        if rollout.response.strip() == answer.response.strip():
            continue
        pairs.append(PreferencePair(prompt=answer.prompt, chosen=answer.response, rejected=rollout.response))
    return pairs


def group_by_prompt(rollouts: Sequence[Rollout], scores: Sequence[float]) -> dict[int, list[tuple[Rollout, float]]]:
    """{prompt_index: [(rollout, score), ...]} in order of first appearance, rollout order within."""
    if len(rollouts) != len(scores):
        raise ValueError(f"rollouts and scores: lengths differ ({len(rollouts)} vs {len(scores)})")
    groups: dict[int, list[tuple[Rollout, float]]] = {}
    for rollout, score in zip(rollouts, scores):
        groups.setdefault(rollout.prompt_index, []).append((rollout, float(score)))
    return groups


def _best(group: list[tuple[Rollout, float]]) -> int:
    # max() keeps the first of equal maxima, so ties go to the earliest sample: deterministic.
    return max(range(len(group)), key=lambda i: group[i][1])


def _worst(group: list[tuple[Rollout, float]]) -> int:
    return min(range(len(group)), key=lambda i: group[i][1])


def best_of_n(rollouts: Sequence[Rollout], scores: Sequence[float]) -> list[Rollout]:
    """Rejection sampling (RJS): the highest-scoring rollout of each prompt; ties go to the earliest."""
    return [group[_best(group)][0] for group in group_by_prompt(rollouts, scores).values()]


def best_and_worst(rollouts: Sequence[Rollout], scores: Sequence[float], min_margin: float = 0.0) -> list[RolloutPair]:
    """DPO pairs: per prompt, the best rollout as chosen and the worst as rejected. Prompts with fewer
    than two samples, or whose best-worst score gap is <= min_margin, give no pair."""
    if min_margin < 0:
        raise ValueError(f"min_margin: must be >= 0, got {min_margin}")
    pairs = []
    for group in group_by_prompt(rollouts, scores).values():
        if len(group) < 2:
            continue
        (best, best_score), (worst, worst_score) = group[_best(group)], group[_worst(group)]
        if best_score - worst_score <= min_margin:
            continue
        pairs.append(RolloutPair(chosen=best, rejected=worst))
    return pairs


def assign_shards(n_items: int, n_workers: int) -> list[list[int]]:
    """Split range(n_items) into n_workers contiguous shards whose sizes differ by at most one."""
    if n_workers < 1:
        raise ValueError(f"n_workers: must be >= 1, got {n_workers}")
    if n_items < 0:
        raise ValueError(f"n_items: must be >= 0, got {n_items}")
    base, extra = divmod(n_items, n_workers)
    shards, start = [], 0
    for worker in range(n_workers):
        size = base + (1 if worker < extra else 0)
        shards.append(list(range(start, start + size)))
        start += size
    return shards


def policy_version_lag(rollouts: Sequence[Rollout], current_version: int) -> dict[str, float]:
    """How many weight versions behind the learner the rollouts were generated: mean and max."""
    if not rollouts:
        raise ValueError("rollouts: empty; no lag to measure")
    lags = [current_version - rollout.policy_version for rollout in rollouts]
    if min(lags) < 0:
        raise ValueError(f"rollouts: a rollout has policy_version above the current version {current_version}")
    return {
        "rollout/policy_version_lag": sum(lags) / len(lags),
        "rollout/policy_version_lag_max": float(max(lags)),
    }


class WeightsDiffer(RuntimeError):
    """A rollout worker's engine does not hold the weights the learner synced: it would sample another policy."""


def check_adapter_versions(rollouts: Sequence[Rollout]) -> None:
    """Every rollout's adapter version (read from its engine) equals the version its worker was last synced."""
    for rollout in rollouts:
        if rollout.adapter_version is not None and rollout.adapter_version != rollout.policy_version:
            raise WeightsDiffer(
                f"rollout worker {rollout.worker} sampled prompt {rollout.prompt_index} with LoRA adapter version "
                f"{rollout.adapter_version}, but was synced to version {rollout.policy_version}: the adapter did not "
                "reach its engine"
            )


def split_rollouts(rollouts: Sequence[Rollout], n_first: int) -> tuple[list[Rollout], list[Rollout]]:
    """Rollouts of one call over two prompt lists joined (the first `n_first` prompts, then the rest) as two
    lists, each indexing its own prompt list: the second's prompt indices are shifted down by `n_first`."""
    if n_first < 0:
        raise ValueError(f"n_first: must be >= 0, got {n_first}")
    first = [r for r in rollouts if r.prompt_index < n_first]
    second = [
        dataclasses.replace(r, prompt_index=r.prompt_index - n_first) for r in rollouts if r.prompt_index >= n_first
    ]
    return first, second
