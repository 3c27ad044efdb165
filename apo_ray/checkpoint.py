"""Round checkpoints: HF-format policy and RM (and PPO's critic) every round, engine (optimizer) state
for exact resume.

A round directory is written under a temporary name and renamed when complete, and `LATEST` is written
after that, so a driver killed mid-checkpoint leaves the previous round as the one to resume from.

A learner of several ranks writes one HF directory (rank 0, after ZeRO-3's gather) and one engine directory
in which every rank writes its own optimizer shard (so on several nodes it must be a shared filesystem); the
ranks are recorded in state.json, since DeepSpeed reloads those shards only on as many ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from apo_ray.config import ConfigError
from apo_ray.learner_group import gather

LATEST = "LATEST"


class Checkpointer:
    def __init__(self, run_dir: Path, keep_engine_states: int = 1):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_engine_states = keep_engine_states

    @property
    def base_reward_dir(self) -> Path:
        """The RM as trained on human pairs before the game: what `reinit_each_round` restarts from."""
        return self.root / "base_reward"

    def round_dir(self, r: int) -> Path:
        return self.root / f"round_{r:04d}"

    def save_base_reward(self, reward: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        gather(reward.save.remote(str(self.base_reward_dir)))

    def save_round(self, r: int, actors: Any, version: int, extra: dict | None = None) -> Path:
        final = self.round_dir(r)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        gather([
            handle.save.remote(str(tmp / name)) for name, handle in _learners(actors)
        ] + [
            handle.save_state.remote(str(tmp / f"engine_{name}")) for name, handle in _learners(actors)
        ])
        state = {"round": r, "policy_version": version, "saved_at": time.time(),
                 "learner_ranks": {name: handle.num_ranks for name, handle in _learners(actors)}, **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        # Renamed into place: a kill mid-write must not leave an empty marker that no resume can read.
        marker = self.root / f"{LATEST}.tmp"
        marker.write_text(str(r))
        os.replace(marker, self.root / LATEST)
        self._prune_engine_states(r)
        return final

    def _prune_engine_states(self, latest: int) -> None:
        # HF weights of every round stay (users evaluate them); optimizer states are large and only the
        # newest ones are needed to resume.
        for r in range(0, latest - self.keep_engine_states + 1):
            for name in ("engine_policy", "engine_reward", "engine_critic", "engine_attacker"):
                shutil.rmtree(self.round_dir(r) / name, ignore_errors=True)

    def latest_round(self) -> int | None:
        marker = self.root / LATEST
        if not marker.exists():
            return None
        r = int(marker.read_text().strip())
        return r if (self.round_dir(r) / "state.json").exists() else None

    def restore(self, r: int, actors: Any) -> dict:
        """Load round r's weights and optimizer state into the learners; return its state.json."""
        d = self.round_dir(r)
        gather([handle.load_state.remote(str(d / f"engine_{name}")) for name, handle in _learners(actors)])
        return self.read_state(r)

    def read_state(self, r: int) -> dict:
        """Round r's state.json: its policy version and whatever the game saved as `extra`."""
        return json.loads((self.round_dir(r) / "state.json").read_text())


def check_same_ranks(saved: dict, ranks: dict[str, int], r: int) -> None:
    """Refuse to resume round r's engine states on other numbers of ranks than saved them."""
    saved_ranks = saved.get("learner_ranks", {})
    for name, count in ranks.items():
        if saved_ranks.get(name, 1) != count:
            raise ConfigError(
                f"learner.{name}_ranks: round {r} was checkpointed with {saved_ranks.get(name, 1)} {name} rank(s) and "
                f"this run asks for {count}; DeepSpeed reloads each rank's optimizer shard, so resume with the same "
                "learner.num_ranks / learner.*_ranks"
            )


def _learners(actors: Any) -> list[tuple[str, Any]]:
    """(name, actor) of every learner whose weights and optimizer a round checkpoint holds."""
    learners = [("policy", actors.policy), ("reward", actors.reward)]
    if getattr(actors, "critic", None) is not None:
        learners.append(("critic", actors.critic))
    if getattr(actors, "attacker", None) is not None:  # APL's attacker
        learners.append(("attacker", actors.attacker))
    return learners
