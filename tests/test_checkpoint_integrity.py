"""Checkpoints that survive the machine: every file is fsynced before the round is renamed into place, state.json
lists each with its size and checksum, and a resume skips a damaged round for the one before it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import apo_ray.train
from apo_ray.checkpoint import Checkpointer
from apo_ray.config import config_from_dict
from apo_ray.named_tensors import write_checkpoint_dir


def learners_write(r: int):
    """What a round's learners write: an HF safetensors checkpoint and an optimizer state, both real files."""

    def write(directory: Path) -> None:
        weights = [("model.embed_tokens.weight", torch.full((64, 16), float(r))), ("model.norm.weight", torch.ones(16))]
        write_checkpoint_dir(weights, directory / "policy")
        (directory / "engine_policy").mkdir()
        torch.save({"step": r}, directory / "engine_policy" / "engine.pt")

    return write


def three_rounds(run_dir: Path) -> Checkpointer:
    checkpointer = Checkpointer(run_dir)
    for r in range(3):
        checkpointer.write_round(r, learners_write(r), {"round": r, "policy_version": r})
    return checkpointer


def test_every_file_is_fsynced_under_the_temporary_name_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    final = Checkpointer(tmp_path).write_round(0, learners_write(0), {"round": 0})
    tmp = str(final) + ".tmp"
    files = ["policy/model.safetensors", "engine_policy/engine.pt"]
    for name in files:
        assert f"{tmp}/{name}" in synced, (name, synced)
    # The directories after their files, the round's own last; then state.json, then LATEST.
    assert synced.index(f"{tmp}/engine_policy") > synced.index(f"{tmp}/engine_policy/engine.pt")
    assert synced.index(tmp) > max(synced.index(f"{tmp}/{name}") for name in files)
    assert synced.index(f"{tmp}/state.json.tmp") > synced.index(tmp)
    assert synced[-2:] == [str(tmp_path / "checkpoints" / "LATEST.tmp"), str(tmp_path / "checkpoints")]
    listed = json.loads((final / "state.json").read_text())["files"]
    size = (final / "policy" / "model.safetensors").stat().st_size
    assert (
        listed["policy/model.safetensors"]["bytes"] == size and len(listed["policy/model.safetensors"]["sha256"]) == 64
    )


def test_a_truncated_safetensors_file_sends_the_resume_to_the_round_before(tmp_path):
    checkpointer = three_rounds(tmp_path)
    warnings: list[str] = []
    assert checkpointer.latest_intact_round(warnings.append) == 2 and warnings == []
    weights = checkpointer.round_dir(2) / "policy" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    assert checkpointer.latest_intact_round(warnings.append) == 1
    assert warnings == [
        f"the checkpoint of round 2 cannot be resumed: {weights} holds {size // 2} bytes, state.json "
        f"lists {size}; trying round 1"
    ]


def test_a_changed_byte_is_caught_and_a_round_without_optimizer_states_is_skipped(tmp_path):
    checkpointer = three_rounds(tmp_path)
    engine = checkpointer.round_dir(2) / "engine_policy" / "engine.pt"
    data = bytearray(engine.read_bytes())
    data[-1] ^= 0xFF
    engine.write_bytes(bytes(data))
    (checkpointer.round_dir(1) / "state.json").write_text("{")
    warnings: list[str] = []
    # Round 0's optimizer state was deleted when round 2 was saved: nothing is left to resume exactly.
    assert checkpointer.latest_intact_round(warnings.append) is None
    assert warnings[0] == (
        f"the checkpoint of round 2 cannot be resumed: {engine}: its SHA-256 differs from the one "
        "state.json lists; trying round 1"
    )
    assert warnings[1].startswith(
        f"the checkpoint of round 1 cannot be resumed: {checkpointer.round_dir(1) / 'state.json'} cannot be read ("
    )
    assert warnings[2] == (
        "the checkpoint of round 0 cannot be resumed: its optimizer states (engine_policy) were "
        "deleted when a later round was saved (the two newest rounds keep theirs); no older round "
        "is left: the run starts from round 0"
    )


def test_resume_continues_after_the_last_intact_round_and_says_why(tmp_path, caplog):
    run_dir = tmp_path / "run"
    checkpointer = three_rounds(run_dir)
    cfg = config_from_dict({"run_dir": str(run_dir), "rollout": {"backend": "hf"}})
    (run_dir / apo_ray.train.CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict()))
    weights = checkpointer.round_dir(2) / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="apo_ray.train"):
        assert apo_ray.train.checked_run_dir(cfg, resume=True) == (run_dir, 1)
    assert f"the checkpoint of round 2 cannot be resumed: {weights} holds 100 bytes" in caplog.text


def test_a_round_written_before_files_were_listed_is_taken_as_it_is(tmp_path):
    checkpointer, r = Checkpointer(tmp_path), 0
    checkpointer.write_round(r, learners_write(r), {"round": r})
    state = checkpointer.round_dir(r) / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "files"}))
    assert checkpointer.latest_intact_round(lambda message: pytest.fail(message)) == r
