"""Round checkpoints: HF-format policy and RM (and PPO's critic) every round, engine (optimizer) state
for exact resume. A LoRA policy's is its adapter in PEFT's format, with its merged HF model in merged/ on
checkpoint.merge_lora (docs/lora.md).

A round directory is written under a temporary name and renamed when complete, and `LATEST` is written
after that, so a driver killed mid-checkpoint leaves the previous round as the one to resume from. Before the
rename every file is fsynced (then the directories), so that a machine that loses power after it keeps what the
rename promised; state.json lists every file with its size and SHA-256, and `--resume` takes the newest round
whose files all match (a damaged one is skipped, saying why). The optimizer states of the two newest rounds stay,
so that the round before a damaged one can still be resumed exactly.

A learner of several ranks writes one HF directory (rank 0, after ZeRO-3's gather) and one engine directory
in which every rank writes its own optimizer shard (so on several nodes it must be a shared filesystem); the
ranks are recorded in state.json, since DeepSpeed reloads those shards only on as many ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apo_ray.config import ConfigError
from apo_ray.learner_group import gather

LATEST = "LATEST"
STATE = "state.json"
ENGINE_DIRS = ("engine_policy", "engine_reward", "engine_critic", "engine_attacker")
CHUNK_BYTES = 16 * 2**20


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(directory: Path) -> dict[str, dict[str, Any]]:
    """fsync every file under `directory` and then every directory; returns {relative path: {"bytes", "sha256"}}
    of the files, read back from disk as they were fsynced."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
            os.fsync(handle.fileno())
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync(sub)
    _fsync(directory)
    return files


def damage(directory: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first file of `files` (seal's listing) that is missing or differs in size or checksum, in words."""
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} holds {size} bytes, {STATE} lists {expected['bytes']}"
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            return f"{path}: its SHA-256 differs from the one {STATE} lists"
    return None


class Checkpointer:
    def __init__(self, run_dir: Path, keep_engine_states: int = 2, merge_lora: bool = False):
        """merge_lora: checkpoint.merge_lora, a LoRA learner's merged model beside its adapter."""
        self.root = Path(run_dir) / "checkpoints"
        self.keep_engine_states = keep_engine_states
        self.merge_lora = merge_lora

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
        def write(directory: Path) -> None:
            gather(
                [
                    handle.save_checkpoint.remote(str(directory / name), merge_lora=self.merge_lora)
                    for name, handle in _learners(actors)
                ]
                + [handle.save_state.remote(str(directory / f"engine_{name}")) for name, handle in _learners(actors)]
            )

        state = {
            "round": r,
            "policy_version": version,
            "saved_at": time.time(),
            "learner_ranks": {name: handle.num_ranks for name, handle in _learners(actors)},
            **(extra or {}),
        }
        return self.write_round(r, write, state)

    def write_round(self, r: int, write: Callable[[Path], None], state: dict) -> Path:
        """Round r's checkpoint: `write(directory)` fills it (the learners save into it), then every file is
        fsynced and listed in state.json, and only then is it renamed into place and named in LATEST."""
        final = self.round_dir(r)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        files = seal(tmp)
        self._write_durably(tmp / STATE, json.dumps({**state, "files": files}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        # Renamed into place: a kill mid-write must not leave an empty marker that no resume can read.
        self._write_durably(self.root / LATEST, str(r))
        self._prune_engine_states(r)
        return final

    @staticmethod
    def _write_durably(path: Path, text: str) -> None:
        """`text` into `path` through a temporary file that is fsynced and renamed; the directory is fsynced too,
        which makes the rename itself durable."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)

    def _prune_engine_states(self, latest: int) -> None:
        # HF weights of every round stay (users evaluate them); optimizer states are large and only the
        # newest ones are needed to resume.
        for r in range(latest - self.keep_engine_states + 1):
            for name in ENGINE_DIRS:
                shutil.rmtree(self.round_dir(r) / name, ignore_errors=True)

    def latest_round(self) -> int | None:
        marker = self.root / LATEST
        if not marker.exists():
            return None
        r = int(marker.read_text().strip())
        return r if (self.round_dir(r) / STATE).exists() else None

    def latest_intact_round(self, warn: Callable[[str], None]) -> int | None:
        """The newest round a resume can continue from: every file its state.json lists is there with its size and
        checksum, optimizer states included. A damaged round is skipped for the one before it, with `warn` saying
        why. (A round written before state.json listed its files is taken as it is.)"""
        newest = self.latest_round()
        marker = self.root / LATEST
        if newest is None and marker.exists():
            newest = int(marker.read_text().strip())
        for r in range(-1 if newest is None else newest, -1, -1):
            problem = self.round_damage(r)
            if problem is None:
                return r
            older = f"trying round {r - 1}" if r > 0 else "no older round is left: the run starts from round 0"
            warn(f"the checkpoint of round {r} cannot be resumed: {problem}; {older}")
        return None

    def round_damage(self, r: int) -> str | None:
        """Why round r cannot be resumed, or None."""
        directory = self.round_dir(r)
        try:
            state = json.loads((directory / STATE).read_text())
        except (OSError, ValueError) as error:
            return f"{directory / STATE} cannot be read ({error})"
        files = state.get("files")
        if files is None:
            return None
        listed_engines = {name.split("/", 1)[0] for name in files if name.split("/", 1)[0] in ENGINE_DIRS}
        pruned = sorted(name for name in listed_engines if not (directory / name).exists())
        if pruned:
            return (
                f"its optimizer states ({', '.join(pruned)}) were deleted when a later round was saved (the two "
                "newest rounds keep theirs)"
            )
        return damage(directory, files)

    def restore(self, r: int, actors: Any) -> dict:
        """Load round r's weights and optimizer state into the learners; return its state.json."""
        d = self.round_dir(r)
        gather([handle.load_state.remote(str(d / f"engine_{name}")) for name, handle in _learners(actors)])
        return self.read_state(r)

    def read_state(self, r: int) -> dict:
        """Round r's state.json: its policy version and whatever the game saved as `extra`."""
        return json.loads((self.round_dir(r) / STATE).read_text())


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
