"""What the game loop asks of a policy step (the min player): the round's prompts, the update on their
scored samples, and the state it keeps across rounds. One strategy per family: apo_ray/offline.py (RJS,
RRHF, DPO), apo_ray/online.py (PPO, GRPO, REINFORCE++)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from apo_ray.game import Rollout


class PolicyStep(ABC):
    # The metrics of the one-line summary of each round (apo_ray.metric_catalog.round_line).
    summary_keys: tuple[str, ...] = ()

    @abstractmethod
    def prompts(self, r: int) -> list[str]:
        """The policy prompts of round r."""

    def start_round(self, r: int) -> dict[str, float]:
        """Work before round r samples; the stats it returns are logged with the round's."""
        return {}

    @abstractmethod
    def update(self, r: int, rollouts: list[Rollout], scores: list[float], seed: int) -> dict[str, float]:
        """The policy step on round r's samples and their RM scores; returns its stats."""

    def after_sync(self, stats: dict[str, float], n_samples: int) -> None:
        """Work once the round's weights are on the rollout workers."""

    def evaluate(self, r: int) -> dict[str, float]:
        """Measurements of this step's own game, taken with the evaluation (round 0 included)."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """State beyond the learners' that a resumed run needs (saved in the round's state.json)."""
        return {}

    def restore(self, saved: dict[str, Any]) -> None:
        """Take back what `checkpoint_extra` saved, before a resumed run's first round."""
