"""What a stage is to the training loop: its data (loaded in the driver) and a task object per worker that
loads the model, computes the loss of a batch and evaluates held-out items."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from apo_ray.config import StageConfig


@dataclass
class StageData:
    train: list[Any]
    eval: list[Any]
    # Counts reported in the run's summary (sizes, truncated sequences).
    summary: dict[str, Any] = field(default_factory=dict)


class StageTask(Protocol):
    # What one training item is ("pairs", "examples"), for rates and messages.
    unit: str
    tokenizer: Any

    def load_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, items: list[Any]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def eval_records(self, model: torch.nn.Module, items: list[Any]) -> list[tuple[float, ...]]: ...

    def eval_metrics(self, records: Sequence[tuple[float, ...]]) -> dict[str, float]: ...


def items_with_truncation(
    cfg: StageConfig, loader: Callable[[Any], list[Any]], truncation: Callable[[list[Any]], dict[str, int]]
) -> StageData:
    """The stage's training items and, with cfg.eval, its held-out ones, with what `truncation` counts of each."""
    train = loader(cfg.train)
    evaluation = loader(cfg.eval) if cfg.eval is not None else []
    summary = {"train": truncation(train)}
    if evaluation:
        summary["eval"] = truncation(evaluation)
    return StageData(train, evaluation, summary)


def task_class(cfg: StageConfig) -> type:
    """The task class of cfg's stage, imported here so that a worker loads only the one it runs."""
    if cfg.STAGE == "rm":
        from apo_ray.stages.reward_model import RewardModelTask

        return RewardModelTask
    from apo_ray.stages.sft import SFTTask

    return SFTTask


def make_task(cfg: StageConfig) -> StageTask:
    return task_class(cfg)(cfg)


def load_stage_data(cfg: StageConfig) -> StageData:
    if cfg.STAGE == "rm":
        from apo_ray.stages.reward_model import load_rm_data

        return load_rm_data(cfg)
    from apo_ray.stages.sft import load_sft_data

    return load_sft_data(cfg)
