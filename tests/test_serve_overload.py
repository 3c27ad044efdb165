"""`apo-ray serve` past its capacity and with a replica killed mid-request, through real HTTP on 127.0.0.1: a full
queue answers 503 with Retry-After at once rather than letting requests wait out their time-out, and a request
whose replica dies gets a retryable 503 while Serve starts another replica. The RM's replica is slowed by an
injected stall (apo_ray/fault_injection.py) so that requests pile up on a tiny builtin model."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import requests

from apo_ray.fault_injection import ENV as FAULTS_ENV
from apo_ray.serve.ingress import unavailable
from tests.conftest import free_port

ITEMS = [{"prompt": "topic : river ; about : night ; answer :", "response": "the river is calm"}]


def test_a_full_queue_and_a_dead_replica_are_503s_with_retry_after():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    busy = unavailable(BackPressureError(num_queued_requests=3, max_queued_requests=3), "reward", 1.5)
    assert (busy.status, busy.field, busy.retry_after_s) == (503, "reward", 1.5)
    assert "max_queued_requests=3" in busy.message and busy.message.endswith("send it again after 2 s")
    dead = unavailable(ActorDiedError(), "policy", 1.0)
    assert dead.status == 503 and "replica running this request stopped" in dead.message
    assert dead.to_openai_json()["error"]["type"] == "server_error"


@pytest.fixture(scope="module")
def slow_rm(ray_cluster, tmp_path_factory):
    """A reward-only deployment on one replica whose every batch stalls 2 s: 2 requests run, 2 may wait."""
    import os

    from ray import serve

    from apo_ray.builtin.models import make_reward_model, make_tokenizer
    from apo_ray.serve.app import check_targets, deploy, load_serve_config
    from apo_ray.serve.targets import resolve_targets

    checkpoint = tmp_path_factory.mktemp("serve-overload") / "round"
    make_reward_model(checkpoint / "reward", make_tokenizer(), seed=2)
    targets = resolve_targets([str(checkpoint)])
    cfg = check_targets(
        targets,
        load_serve_config(
            None,
            {},
            [
                f"serve.port={free_port()}",
                "serve.reward.num_cpus=0.5",
                "serve.ingress.num_cpus=0.25",
                "serve.score_max_batch_size=1",
                "serve.reward.max_queued_requests=2",
                "serve.retry_after_s=3",
            ],
        ),
    )
    os.environ[FAULTS_ENV] = json.dumps([{"kind": "stall", "phase": "score", "seconds": 2.0}])
    try:
        url = deploy(targets, cfg, None)
    finally:
        del os.environ[FAULTS_ENV]
    yield url
    serve.shutdown()


def score(url: str) -> requests.Response:
    return requests.post(url + "/score", json=ITEMS, timeout=60)


@pytest.mark.integration
def test_past_capacity_requests_get_503_with_retry_after_at_once(slow_rm):
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: (score(slow_rm), time.monotonic() - started), range(12)))
    served = [seconds for r, seconds in answers if r.status_code == 200]
    refused = [(r, seconds) for r, seconds in answers if r.status_code == 503]
    assert len(served) + len(refused) == 12, [r.status_code for r, _ in answers]
    # Two run and two wait (score_max_batch_size 1 runs 2 at once; max_queued_requests 2): the rest are refused.
    assert 2 <= len(served) <= 6 and len(refused) >= 6, (len(served), len(refused))
    for response, seconds in refused:
        assert response.headers["Retry-After"] == "3"
        assert response.json()["error"]["field"] == "reward" and "max_queued_requests=2" in response.text
        # Refused at once, not after waiting behind the stalled batches.
        assert seconds < 2.0, seconds


@pytest.mark.integration
def test_a_replica_killed_mid_request_gives_a_retryable_503_and_is_replaced(slow_rm):
    import ray

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(score, slow_rm)
        time.sleep(1.0)  # the request is inside the replica's 2 s stall
        [replica] = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and "#reward#" in a["name"]
        ]
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        answer = pending.result()
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "3", answer.text
    assert "replica running this request stopped" in answer.json()["error"]["message"]
    # Serve starts another replica; the same request, sent again, is scored.
    deadline = time.monotonic() + 90
    while (again := score(slow_rm)).status_code != 200:
        assert time.monotonic() < deadline, f"no replica took the request again: {again.status_code} {again.text}"
        time.sleep(float(again.headers.get("Retry-After", "1")))
    assert len(again.json()["scores"]) == 1
