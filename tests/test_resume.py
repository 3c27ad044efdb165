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
from tests.conftest import REPO_ROOT, SMALL_EVAL

# Two runs share the test cluster's 4 logical CPUs: half a CPU per actor.
RUN = [
    "--config",
    str(REPO_ROOT / "configs/default.yaml"),
    "rounds=2",
    "seed=3",
    "rollout.backend=hf",
    "learner.backend=torch",
    "learner.num_cpus=0.5",
    "rollout.num_cpus_per_worker=0.5",
    "samples_per_prompt=2",
    "logging.tensorboard=false",
    "logging.report=false",
    "data.builtin.n_pairs=64",
    "data.builtin.n_gold=16",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=32",
    "reward.initial_epochs=1",
    "policy.epochs_per_round=1",
    *SMALL_EVAL,
]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

# Wall-clock measurements (timings, rates, shares of the matmul ceiling) differ between any two runs; everything
# else must not. The same rule as the refactoring check's.
from same_metrics import WALL_CLOCK  # noqa: E402


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows}
    assert len(by_step) == len(rows), f"a round was logged twice: {[row['step'] for row in rows]}"
    return {step: {k: v for k, v in row.items() if not WALL_CLOCK.search(k)} for step, row in by_step.items()}


def kill_after_checkpoint(driver: subprocess.Popen, run_dir: Path, round_index: int, timeout_s: float) -> None:
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.monotonic() + timeout_s
    while driver.poll() is None and time.monotonic() < deadline:
        if latest.exists() and latest.read_text() == str(round_index):
            os.kill(driver.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def kill_and_resume(run: list[str], tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """Plays `run` twice on the test cluster: once uninterrupted, in this process, and meanwhile once in a
    driver killed as round 1's checkpoint lands and then `--resume`d. Returns the killed run's dir, the
    uninterrupted one's, and the rounds the killed run had logged when it died."""
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    # The driver to kill joins the test's cluster, as a `ray job submit` driver joins its cluster: when it
    # dies, Ray reclaims its actors and the cluster lives on.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = (tmp_path / "killed.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "apo_ray.train", *run, f"run_dir={killed_dir}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    killer = threading.Thread(target=kill_after_checkpoint, args=(driver, killed_dir, 1, 600))
    killer.start()
    try:
        assert main([*run, f"run_dir={reference_dir}"]) == 0
        killer.join()
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
        log.close()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert (killed_dir / "checkpoints" / "LATEST").read_text() == "1"
    assert not (killed_dir / "checkpoints" / "round_0002").exists()
    killed_rows = [row["step"] for row in map(json.loads, (killed_dir / "metrics.jsonl").read_text().splitlines())]
    assert main(["--resume", str(killed_dir)]) == 0
    return killed_dir, reference_dir, killed_rows


@pytest.mark.integration
def test_driver_killed_after_a_round_resumes_to_the_same_metrics(ray_cluster, tmp_path):
    killed_dir, reference_dir, killed_rows = kill_and_resume(RUN, tmp_path)
    # Killed as round 1's checkpoint landed: its evaluation was to finish during round 2 (eval.overlap), so
    # its row is in the checkpoint and not in metrics.jsonl; the resume evaluates round 1 in place and must
    # log what the uninterrupted run's overlapped evaluation did.
    state = json.loads((killed_dir / "checkpoints" / "round_0001" / "state.json").read_text())
    assert state["pending_row"]["round"] == 1
    assert killed_rows == [0]

    resumed, reference = metrics(killed_dir), metrics(reference_dir)
    assert sorted(resumed) == sorted(reference) == [0, 1, 2]
    # Round 2 was played by a new driver, new actors and new rollout workers, from round 1's checkpoint.
    assert resumed[2] == reference[2]
    assert resumed[1] == reference[1] and resumed[0] == reference[0]
    assert {"rm/acc", "rm/loss", "policy/loss", "eval/kl", "eval/gold_score", "rollout/tokens"} <= set(resumed[2])


# The sibling games, small: a quarter or half a CPU an actor, so that two runs (1.75 CPUs each) share the
# cluster's 4.
GAMES = {
    # Round 1 anchor-only, round 2 RM + anchor: the resume must reload the frozen discriminator, not refit it.
    "aapa": [
        "--config",
        str(REPO_ROOT / "configs/aapa_grpo.yaml"),
        "eval_every=1",
        "checkpoint_every=1",
        "aapa.epochs=1",
        "aapa.anchor_only_rounds=1",
        "ppo.prompts_per_iteration=8",
        "ppo.minibatch_size=8",
        "ppo.ppo_epochs=1",
        "data.builtin.n_gold=8",
    ],
    # The attacker's learner and rollout worker come back from round 1's checkpoint with the defender.
    "apl": [
        "--config",
        str(REPO_ROOT / "configs/apl.yaml"),
        "apl.prompts_per_round=4",
        "apl.attacks_per_prompt=2",
        "apl.defender_sft_steps=20",
        "apl.attacker.epochs=1",
        "apl.attacker.minibatch_size=8",
        "apl.attacker.num_cpus=0.25",
        "apl.attacker.rollout_num_cpus_per_worker=0.25",
        "policy.epochs_per_round=1",
        "data.builtin.n_gold=8",
    ],
}
GAME_COMMON = [
    "rounds=2",
    "seed=3",
    "samples_per_prompt=2",
    "rollout.backend=hf",
    "learner.backend=torch",
    "learner.num_cpus=0.25",
    "rollout.num_cpus_per_worker=0.25",
    "logging.tensorboard=false",
    "logging.report=false",
    "logging.ray_metrics=false",
    "data.builtin.n_pairs=64",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=16",
    "reward.initial_epochs=1",
    *SMALL_EVAL,
]


@pytest.mark.integration
@pytest.mark.parametrize("game", sorted(GAMES))
def test_a_sibling_game_killed_after_a_round_resumes_to_the_same_metrics(ray_cluster, tmp_path, game):
    killed_dir, reference_dir, _ = kill_and_resume([*GAMES[game], *GAME_COMMON], tmp_path)
    resumed, reference = metrics(killed_dir), metrics(reference_dir)
    assert sorted(resumed) == sorted(reference) == [0, 1, 2]
    assert resumed == reference
    played = {
        "aapa": {"aapa/disc_score", "aapa/anchor_reward", "policy/loss"},
        "apl": {"apl/attacker_harm", "apl/harmful_rate", "apl/attack_success_rate", "policy/loss"},
    }[game]
    assert played <= set(resumed[2])
