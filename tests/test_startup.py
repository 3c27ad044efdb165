"""Learner start-up cannot hang silently: a torch extension build lock left by a killed build is removed or
named before DeepSpeed could wait on it, DeepSpeed learners need no JIT-built op, and a learner whose
constructor does not return stops the start after learner.startup_timeout_s, naming it and the lock."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.cpp_extension import _get_build_directory
from torch.utils.file_baton import FileBaton

from apo_ray import build_locks
from tests.conftest import REPO_ROOT

SHM_OP = "deepspeed_shm_comm"


def lock_of(op: str) -> Path:
    """Where torch itself puts the build lock of `op` (the directory is created, as a build would)."""
    return Path(_get_build_directory(op, verbose=False)) / "lock"


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    return tmp_path / "torch_extensions"


def test_a_lock_nobody_holds_is_stale_and_removed_one_held_is_named(extensions_dir, caplog):
    stale = lock_of(SHM_OP)
    stale.touch()
    held = lock_of("cpu_adam")
    baton = FileBaton(str(held))
    assert baton.try_acquire()
    try:
        assert build_locks.lock_holders(stale) == []
        assert build_locks.lock_holders(held) == [os.getpid()]
        report = build_locks.report()
        assert f"{stale} (stale: no process holds it" in report and f"{held} (a build in progress" in report, report

        assert build_locks.clear_stale() == [stale]
        assert not stale.exists() and held.exists()
        warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert f"removed the stale torch extension build lock {stale}: no process holds it" in warned
        assert f"{held} (a build in progress: held by pid {os.getpid()})" in warned
    finally:
        baton.release()
    assert build_locks.report() == ""


def test_locks_are_found_in_torchs_default_cache_too(tmp_path, monkeypatch):
    # Without TORCH_EXTENSIONS_DIR torch builds under the user cache, in a folder per Python and accelerator.
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    stale = lock_of(SHM_OP)
    stale.touch()
    assert stale.is_relative_to(tmp_path) and build_locks.build_locks() == [stale]


def killed_mid_build(lock: Path) -> None:
    """A process that takes the build lock the way torch does and is killed (SIGKILL) while holding it."""
    script = (
        "import sys, time; from torch.utils.file_baton import FileBaton; "
        "assert FileBaton(sys.argv[1]).try_acquire(); print('building', flush=True); time.sleep(600)"
    )
    builder = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline() == "building\n"
    builder.kill()
    builder.wait()
    assert lock.exists()


@pytest.mark.integration
def test_a_deepspeed_learner_starts_after_a_build_was_killed_holding_the_lock(extensions_dir):
    # DeepSpeed would rebuild its shm comm op under this lock and wait for it forever.
    lock = lock_of(SHM_OP)
    killed_mid_build(lock)
    script = """
import torch
from apo_ray.actors.engine import TrainEngine
engine = TrainEngine(torch.nn.Linear(4, 1), backend="deepspeed", lr=0.1, zero_stage=2, grad_clip=1.0,
                     weight_decay=0.0, micro_batch_size=2)
engine.step(engine.module(torch.ones(2, 4)).sum())
print("stepped", flush=True)
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "stepped" in done.stdout, done.stderr[-3000:]
    assert f"removed the stale torch extension build lock {lock}" in done.stderr
    assert not lock.exists()
    # The learner needed no op: nothing was built.
    assert not list(extensions_dir.rglob("*.so"))


@pytest.mark.integration
def test_a_learner_that_does_not_come_up_stops_the_start_naming_it_and_the_lock(ray_cluster, extensions_dir):
    from apo_ray.actor_group import ActorGroup, ActorStartupTimeout, wait_until_ready
    from apo_ray.cluster import learner_startup_hint
    from apo_ray.config import LearnerConfig

    class BuildsAnOp:
        """Starts the way a learner that JIT-builds an op does: it waits while the op's build lock exists."""

        def __init__(self, lock: str):
            baton = FileBaton(lock)
            if baton.try_acquire():
                baton.release()
            else:
                baton.wait()

    lock = lock_of(SHM_OP)
    killed_mid_build(lock)
    learner = LearnerConfig(startup_timeout_s=5.0)
    group = ActorGroup(
        BuildsAnOp,
        1,
        name_prefix="reward-learner-test",
        num_cpus_per_actor=0.5,
        make_kwargs=lambda index: {"lock": str(lock)},
    )
    try:
        started = time.monotonic()
        with pytest.raises(ActorStartupTimeout) as raised:
            wait_until_ready([group], learner.startup_timeout_s, diagnose=lambda: learner_startup_hint(learner))
        assert time.monotonic() - started < 60
    finally:
        group.kill()
    message = str(raised.value)
    assert message.startswith("reward-learner-test-0: not up 5 s after starting (the constructor has not returned)")
    assert f"{lock} (stale: no process holds it, a build was killed mid-way; delete it) on the driver's node" in message
    assert "Raise learner.startup_timeout_s (5)" in message


@pytest.mark.integration
def test_a_learner_that_fails_to_start_is_reported_at_once(ray_cluster, tmp_path):
    import ray

    from apo_ray.actor_group import ActorGroup, wait_until_ready
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig

    missing = tmp_path / "no_such_model"
    group = ActorGroup(
        RewardLearner,
        1,
        name_prefix="reward-learner-test",
        num_cpus_per_actor=0.5,
        make_kwargs=lambda index: dict(model_path=str(missing), reward=RewardConfig(), learner=LearnerConfig()),
    )
    try:
        started = time.monotonic()
        with pytest.raises(ray.exceptions.RayActorError, match="no_such_model"):
            wait_until_ready([group], 600.0)
        assert time.monotonic() - started < 120
    finally:
        group.kill()


@pytest.mark.integration
def test_a_start_up_timeout_exits_4_naming_the_learners(ray_cluster, tmp_path, capsys):
    """Through the CLI: learners cannot load their models in a tenth of a second; the run stops with an error
    line and exit code 4, not a traceback, and leaves no actor behind."""
    import ray

    from apo_ray.train import main

    code = main(
        [
            "--config",
            str(REPO_ROOT / "configs/default.yaml"),
            f"run_dir={tmp_path / 'run'}",
            "learner.startup_timeout_s=0.1",
            "data.builtin.n_pairs=32",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.startswith("error: ") and "not up 0.1 s after starting" in err and "policy-learner-" in err
    assert "Raise learner.startup_timeout_s (0.1)" in err
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "learner-" in str(a)]
    assert not alive, alive


@pytest.mark.integration
def test_a_resize_that_fails_midway_keeps_its_bundles_for_the_next_and_kill_frees_them(ray_cluster):
    import ray
    from ray.util import placement_group_table

    from apo_ray.actor_group import ActorGroup

    class Idle:
        pass

    broken = {"from": 2}

    def make_kwargs(index: int) -> dict:
        if index >= broken["from"]:
            raise ValueError(f"no settings for actor {index}")
        return {}

    def live_groups() -> set[str]:
        return {key for key, row in placement_group_table().items() if row["state"] != "REMOVED"}

    before = live_groups()
    group = ActorGroup(Idle, 1, name_prefix="resize-test", num_cpus_per_actor=0.1, make_kwargs=make_kwargs)
    try:
        with pytest.raises(ValueError, match="no settings for actor 2"):
            group.resize(4)  # one new placement group of 3 bundles; actors 2 and 3 never start
        assert len(group) == 2 and len(live_groups() - before) == 2
        broken["from"] = 99
        group.resize(4)  # the two bundles left over, no third placement group
        assert len(group) == 4 and len(live_groups() - before) == 2
        ray.get([handle.__ray_ready__.remote() for handle in group.actors])
    finally:
        group.kill()
    assert live_groups() - before == set()
