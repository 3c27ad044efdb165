"""Faults of a long run: a non-finite loss stops training and keeps the last good checkpoint resumable;
an unwritable run directory or a full disk is reported before training starts; two runs on one node do
not fight over a rendezvous port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

import apo_ray.train
from apo_ray.actors.engine import TrainEngine
from apo_ray.fault_injection import ENV as FAULTS_ENV
from apo_ray.train import main
from tests.conftest import REPO_ROOT, SMALL_EVAL

# The builtin task, small, with the HF rollout engine and plain torch learners.
SMALL_RUN = [
    "rollout.backend=hf",
    "learner.backend=torch",
    "samples_per_prompt=2",
    "logging.tensorboard=false",
    "logging.report=false",
    "data.builtin.n_pairs=64",
    "data.builtin.n_gold=16",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=32",
    "reward.initial_epochs=1",
    *SMALL_EVAL,
]


def torch_engine(model: torch.nn.Module, lr: float = 0.1) -> TrainEngine:
    return TrainEngine(model, backend="torch", lr=lr, zero_stage=0, grad_clip=1.0, weight_decay=0.0, micro_batch_size=2)


def test_engine_refuses_a_non_finite_loss_and_keeps_the_weights():
    model = torch.nn.Linear(3, 1)
    engine = torch_engine(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"loss is nan at training step 1 of this learner"):
        engine.step(model(torch.full((2, 3), float("nan"))).sum())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    engine.step(model(torch.ones(2, 3)).sum())
    assert engine.steps == 2 and not torch.equal(model.weight, before[0])


def test_engine_refuses_a_non_finite_gradient_of_a_finite_loss():
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine = torch_engine(model)
    # sqrt(|w|) is 0 at w = 0, its gradient is not finite there.
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at training step 1"):
        engine.step(model.weight.abs().sqrt().sum())
    assert torch.equal(model.weight, torch.zeros(1, 3)) and model.weight.grad is None


def test_resumed_engine_takes_the_configured_learning_rate(tmp_path):
    # The way out of a diverged run is `--resume run_dir policy.lr=<lower>`: the checkpoint's optimizer state
    # must not bring the old learning rate back.
    diverging = torch_engine(torch.nn.Linear(3, 1), lr=1e30)
    diverging.step(diverging.module(torch.ones(2, 3)).sum())
    diverging.save_state(tmp_path)
    resumed = torch_engine(torch.nn.Linear(3, 1), lr=1e-3)
    resumed.load_state(tmp_path)
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [1e-3]
    assert torch.equal(resumed.model.weight, diverging.model.weight)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 1


@pytest.mark.integration
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint_resumable(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # policy.lr=1e30: the first policy step of round 1 sends the weights to ~1e30, the second step meets
    # non-finite numbers. Round 0 was checkpointed with sane weights.
    code = main(
        [
            "--config",
            str(REPO_ROOT / "configs/default.yaml"),
            f"run_dir={run_dir}",
            "rounds=1",
            "policy.epochs_per_round=2",
            "policy.lr=1e30",
            *SMALL_RUN,
        ]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert re.search(
        r"error: training diverged in (\S+:)?PolicyLearner\.sample_step after round 0: "
        r"(loss|gradient norm) is (nan|inf)",
        err,
    ), err
    assert "at training step 2 of this learner; the step was stopped before it changed the weights" in err, err
    assert f"continue with `apo-ray train --resume {run_dir}" in err
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "LATEST").read_text() == "0"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["LATEST", "base_reward", "round_0000"]
    round_0 = (run_dir / "metrics.jsonl").read_text()

    assert main(["--resume", str(run_dir), "policy.lr=1e-3"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1]
    assert (run_dir / "metrics.jsonl").read_text().startswith(round_0)
    assert all(value is not None for value in rows[1].values()), rows[1]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["policy"]["lr"] == 1e-3


@pytest.fixture
def files_config(tmp_path) -> Path:
    """A valid config for task 'files' whose validation reads no model (a stand-in model directory)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(20)))
    config = tmp_path / "files.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"task": "files", "source": {"path": str(data)}},
                "model": {"policy_path": str(model), "reward_path": str(model), "eval_reward": str(model)},
            }
        )
    )
    return config


@pytest.fixture
def nothing_may_start(monkeypatch):
    def reached(prepared):
        raise AssertionError("the run directory was accepted: training would start now")

    monkeypatch.setattr(apo_ray.train, "run", reached)


@pytest.mark.parametrize("where", ["read_only_dir", "procfs", "under_a_file"])
def test_unwritable_run_dir_is_reported_before_training(where, files_config, tmp_path, capsys, nothing_may_start):
    if where == "read_only_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes into a mode 555 directory")
        parent = tmp_path / "read_only"
        parent.mkdir(mode=0o555)
        run_dir, message = parent / "run", "is not writable"
    elif where == "procfs":
        # procfs refuses new files even to root: a stand-in for a read-only mount.
        run_dir, message = Path("/proc/self/apo-ray-run"), "is not writable"
    else:
        (tmp_path / "a_file").write_text("")
        run_dir, message = tmp_path / "a_file" / "run", "a_file is not a directory"
    assert main(["--config", str(files_config), f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run_dir: {run_dir}") and message in err, err
    assert not run_dir.exists()


def test_full_disk_is_reported_before_training(files_config, tmp_path, capsys, monkeypatch, nothing_may_start):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(apo_ray.train.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 10 * 2**20, 10 * 2**20))
    run_dir = tmp_path / "run"
    assert main(["--config", str(files_config), f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"error: run_dir: only 10 MiB free on the disk of {run_dir}; need 200 MiB" in err, err
    assert not run_dir.exists()


@pytest.mark.integration
def test_a_stalled_learner_step_stops_the_run_with_exit_code_6_naming_where(ray_cluster, tmp_path, capsys, monkeypatch):
    # Every learner's first training step sleeps far past learner.call_timeout_s: round 0's RM fit meets it first.
    monkeypatch.setenv(FAULTS_ENV, json.dumps([{"kind": "stall", "phase": "step", "seconds": 3600}]))
    run_dir = tmp_path / "run"
    code = main(
        [
            "--config",
            str(REPO_ROOT / "configs/default.yaml"),
            f"run_dir={run_dir}",
            "rounds=1",
            "learner.call_timeout_s=15",
            *SMALL_RUN,
        ]
    )
    err = capsys.readouterr().err
    assert code == 6, err
    assert re.search(
        r"error: reward-learner-\w+-0, rank 0 of the 1-rank reward learner, on node [0-9a-f]+, did not "
        r"finish \w+ within 15 s \(raise learner.call_timeout_s if it needs longer\) \(round 0, phase "
        r"rm_init\)\. No round was checkpointed yet: start the run again",
        err,
    ), err


@pytest.mark.integration
def test_deepspeed_learner_starts_while_another_process_holds_its_port():
    # Two runs on one node each picked a "free" rendezvous port and one lost the race (EADDRINUSE). A lone
    # rank now needs no port at all: this learner starts even though its master_port is taken.
    script = """
import socket, sys, torch
from apo_ray.actors.engine import TrainEngine
from apo_ray.fault_injection import ENV as FAULTS_ENV
held = socket.socket(); held.bind(("127.0.0.1", 0)); held.listen()
model = torch.nn.Linear(4, 1)
before = model.weight.detach().clone()
engine = TrainEngine(model, backend="deepspeed", lr=0.1, zero_stage=2, grad_clip=1.0, weight_decay=0.0,
                     micro_batch_size=2, master_port=held.getsockname()[1])
engine.step(engine.module(torch.ones(2, 4)).sum())
print("weights moved:", bool((engine.model.weight - before).abs().sum() > 0))
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights moved: True" in done.stdout


@pytest.mark.integration
def test_a_local_cluster_too_small_for_the_run_fails_at_once(tmp_path):
    # The placement groups would otherwise wait ten minutes for GPUs no machine here has.
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "apo_ray.train",
            "--config",
            "configs/default.yaml",
            f"run_dir={run_dir}",
            "rollout.num_gpus_per_worker=64",
            *SMALL_RUN,
        ],
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(
        r"error: the run's actors do not fit: no place for rollout on 1 node x \d+ GPU, \d+ CPU each; "
        r"short by \d+ GPU \(`apo-ray train --dry-run` shows the plan\)",
        done.stderr,
    ), done.stderr[-3000:]
    # Refused before Ray started or anything was written.
    assert not run_dir.exists() and "Started a local Ray instance" not in done.stderr
