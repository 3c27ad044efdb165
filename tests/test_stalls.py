"""Stalled rollout workers, with the stall injected into the real worker's real call (apo_ray/fault_injection.py):
the pool's own deadlines must catch it, replace the worker and re-run its work, and stop only when it cannot
recover, naming the worker, its node and the phase."""

from __future__ import annotations

import json

import pytest

from apo_ray.actor_group import ActorStartupTimeout
from apo_ray.deadlines import DeadlinePassed
from apo_ray.fault_injection import ENV as FAULTS_ENV
from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec

pytestmark = pytest.mark.integration

GREEDY = {"max_new_tokens": 8, "max_prompt_tokens": 32, "temperature": 0.0, "max_model_len": 64, "dtype": "float32"}
PROMPTS = [f"prompt number {i} about the sea" for i in range(8)]
# Far past any deadline below: only the deadline ends the wait.
STALL_S = 3600


def stalling_pool(model_dir: str, name: str, phase: str, worker: int | None, once, **deadlines) -> RolloutPool:
    fault = {"kind": "stall", "phase": phase, "seconds": STALL_S}
    if worker is not None:
        fault["worker"] = worker
    if once is not None:
        fault["once"] = str(once)
    return RolloutPool(
        RolloutWorkerSpec(model_dir, "hf", **GREEDY),
        2,
        num_cpus_per_worker=1,
        name_prefix=name,
        env={FAULTS_ENV: json.dumps([fault])},
        **deadlines,
    )


def test_a_stalled_generate_is_re_run_on_a_replacement(ray_cluster, tiny_lm_dir, tmp_path):
    pool = stalling_pool(tiny_lm_dir, "test-stall-generate", "generate", 1, tmp_path / "fired", generate_timeout_s=10)
    try:
        stalled = pool.workers[1]
        rollouts = pool.generate(PROMPTS, n=2)
        assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(2)]
        assert pool.last_stats()["rollout/worker_failures"] == 1 and pool.workers[1] != stalled
        # The replacement holds the pool's weights and answers: the next call runs on both workers.
        assert {r.worker for r in pool.generate(PROMPTS, n=1)} == {0, 1}
    finally:
        pool.shutdown()


def test_a_pool_that_cannot_recover_from_a_stall_stops_naming_the_worker(ray_cluster, tiny_lm_dir):
    pool = stalling_pool(tiny_lm_dir, "test-stall-every", "generate", None, None, generate_timeout_s=10)
    pool.max_worker_failures = 0
    try:
        with pytest.raises(
            DeadlinePassed,
            match=(
                r"rollout worker test-stall-every-[01] on node \S+ \(0 workers already replaced in this call\) did "
                r"not finish generating 4 prompts within 10 s \(raise rollout.generate_timeout_s"
            ),
        ):
            pool.generate(PROMPTS, n=1)
    finally:
        pool.shutdown()


def test_a_stalled_weight_load_is_replaced_and_loads_as_it_starts(ray_cluster, tiny_lm_dir, tmp_path):
    pool = stalling_pool(tiny_lm_dir, "test-stall-sync", "sync", 0, tmp_path / "fired", sync_timeout_s=10)
    try:
        stalled = pool.workers[0]
        weights = read_weights(tiny_lm_dir)
        pool.sync(weights, 1)
        assert pool.workers[0] != stalled and pool.versions() == [1, 1]
    finally:
        pool.shutdown()


def test_a_replacement_that_stalls_too_stops_the_sync(ray_cluster, tiny_lm_dir):
    # Start-up gets 30 s: the first workers must come up within it on a loaded 2-core machine.
    pool = stalling_pool(tiny_lm_dir, "test-stall-sync-twice", "sync", 0, None, sync_timeout_s=10, startup_timeout_s=30)
    try:
        with pytest.raises(
            DeadlinePassed,
            match=(
                r"rollout worker test-stall-sync-twice-0\.1 on node \S+ did not finish starting and loading "
                r"weights version 1 within 40 s \(raise rollout.sync_timeout_s"
            ),
        ):
            pool.sync(read_weights(tiny_lm_dir), 1)
    finally:
        pool.shutdown()


def test_a_worker_that_does_not_start_stops_the_start_naming_it(ray_cluster, tiny_lm_dir):
    with pytest.raises(ActorStartupTimeout, match=r"test-stall-start-1: not up 10 s after starting"):
        stalling_pool(tiny_lm_dir, "test-stall-start", "start", 1, None, startup_timeout_s=10)


def read_weights(model_dir: str):
    from apo_ray.named_tensors import read_checkpoint_dir

    return list(read_checkpoint_dir(model_dir))


def test_a_learner_step_that_stalls_stops_naming_its_rank_and_node(ray_cluster, tiny_lm_dir):
    from apo_ray.actor_group import wait_until_ready
    from apo_ray.actors.policy import PolicyLearner
    from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
    from apo_ray.game import TokenSample
    from apo_ray.learner_group import LearnerGroup, gather

    fault = {"kind": "stall", "phase": "step", "worker": 0, "seconds": STALL_S}
    group = LearnerGroup(
        PolicyLearner,
        1,
        role="policy",
        name_prefix="policy-test-stall",
        distributed=False,
        kwargs=dict(
            model_path=tiny_lm_dir,
            model=ModelConfig(),
            policy=PolicyConfig(batch_size=2),
            learner=LearnerConfig(backend="torch"),
            seed=0,
        ),
        num_cpus_per_rank=1,
        env={FAULTS_ENV: json.dumps([fault])},
        call_timeout_s=10,
    )
    try:
        wait_until_ready([group.group], 600)
        samples = [TokenSample((101, 2023), (3000, 3001)), TokenSample((101, 2024), (3002,))]
        with pytest.raises(
            DeadlinePassed,
            match=(
                r"policy-test-stall-0, rank 0 of the 1-rank policy learner, on node [0-9a-f]+, did not finish "
                r"sft_step within 10 s \(raise learner.call_timeout_s"
            ),
        ):
            gather(group.sft_step.remote(samples, epochs=1, seed=0))
    finally:
        group.kill()
