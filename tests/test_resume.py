"""The driver killed mid-run (SIGKILL, no chance to clean up) and `--resume`d: with a fixed seed the resumed
run's later rounds equal an uninterrupted run's, metric for metric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from apo_ray.train import main

REPO_ROOT = Path(__file__).resolve().parents[1]
# Two runs share the test cluster's 4 logical CPUs: half a CPU per actor.
RUN = [
    "--config", str(REPO_ROOT / "configs/default.yaml"), "rounds=2", "seed=3",
    "rollout.backend=hf", "learner.backend=torch", "learner.num_cpus=0.5", "rollout.num_cpus_per_worker=0.5",
    "samples_per_prompt=2", "logging.tensorboard=false", "logging.report=false", "data.builtin.n_pairs=64",
    "data.builtin.n_gold=16", "data.builtin.n_prompts=16", "data.builtin.n_eval_pairs=32",
    "reward.initial_epochs=1", "policy.epochs_per_round=1",
]
# Wall-clock measurements differ between any two runs; everything else must not.
TIMED = ("timing/", "rollout/tokens_per_s")


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows}
    assert len(by_step) == len(rows), f"a round was logged twice: {[row['step'] for row in rows]}"
    return {step: {k: v for k, v in row.items() if not k.startswith(TIMED)} for step, row in by_step.items()}


def kill_after_checkpoint(driver: subprocess.Popen, run_dir: Path, round_index: int, timeout_s: float) -> None:
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.monotonic() + timeout_s
    while driver.poll() is None and time.monotonic() < deadline:
        if latest.exists() and latest.read_text() == str(round_index):
            os.kill(driver.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.integration
def test_driver_killed_after_a_round_resumes_to_the_same_metrics(ray_cluster, tmp_path):
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    # The driver to kill joins the test's cluster, as a `ray job submit` driver joins its cluster: when it
    # dies, Ray reclaims its actors and the cluster lives on.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = (tmp_path / "killed.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "apo_ray.train", *RUN, f"run_dir={killed_dir}"], cwd=REPO_ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    killer = threading.Thread(target=kill_after_checkpoint, args=(driver, killed_dir, 1, 600))
    killer.start()
    try:
        # The uninterrupted reference plays meanwhile, in this process.
        assert main([*RUN, f"run_dir={reference_dir}"]) == 0
        killer.join()
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
        log.close()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert (killed_dir / "checkpoints" / "LATEST").read_text() == "1"
    assert not (killed_dir / "checkpoints" / "round_0002").exists()
    # Killed as round 1's checkpoint landed: its evaluation was to finish during round 2 (eval.overlap), so
    # its row is in the checkpoint and not in metrics.jsonl; the resume evaluates round 1 in place and must
    # log what the uninterrupted run's overlapped evaluation did.
    state = json.loads((killed_dir / "checkpoints" / "round_0001" / "state.json").read_text())
    assert state["pending_row"]["round"] == 1
    assert [row["step"] for row in map(json.loads, (killed_dir / "metrics.jsonl").read_text().splitlines())] == [0]

    assert main(["--resume", str(killed_dir)]) == 0

    resumed, reference = metrics(killed_dir), metrics(reference_dir)
    assert sorted(resumed) == sorted(reference) == [0, 1, 2]
    # Round 2 was played by a new driver, new actors and new rollout workers, from round 1's checkpoint.
    assert resumed[2] == reference[2]
    assert resumed[1] == reference[1] and resumed[0] == reference[0]
    assert {"rm/acc", "rm/loss", "policy/loss", "eval/kl", "eval/gold_score", "rollout/tokens"} <= set(resumed[2])
