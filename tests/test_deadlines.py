"""Deadlines: what each wait may take, derived from its work, and joining a cluster that does not answer."""

from __future__ import annotations

import socket
import time

import pytest
import ray

import apo_ray.train
from apo_ray.cluster import init_ray
from apo_ray.config import config_from_dict
from apo_ray.deadlines import (
    ClusterUnreachable,
    gcs_endpoint,
    generate_deadline_s,
    learner_call_deadline_s,
    probe_cluster,
    startup_deadline_s,
    sync_deadline_s,
)


@pytest.fixture
def closed_port() -> int:
    """A port of this machine that nothing listens on (bound to find it free, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_defaults_grow_with_the_work_and_a_key_overrides_them():
    # 120 s, then 0.5 s per token: 4 samples of up to 32 tokens.
    assert generate_deadline_s(4, 32, None) == 120.0 + 64.0
    assert generate_deadline_s(4, 32, 7.5) == 7.5
    # 120 s, then 1 s per 4 MB.
    assert sync_deadline_s(538_000_000, None) == 120.0 + 134.5
    assert sync_deadline_s(538_000_000, 30.0) == 30.0
    assert startup_deadline_s(4_000_000, None) == 301.0
    # 900 s, then 10 s per sample per epoch; a checkpoint (no samples) gets the floor.
    assert learner_call_deadline_s(16, 2, None) == 900.0 + 320.0
    assert learner_call_deadline_s(0, 1, None) == 900.0
    assert learner_call_deadline_s(16, 2, 60.0) == 60.0


@pytest.mark.parametrize(
    "address, endpoint",
    [
        ("10.0.0.2:6379", ("10.0.0.2", 6379)),
        ("ray://head.example:10001", ("head.example", 10001)),
        ("auto", None),
        ("local", None),
        ("head-without-port", None),
    ],
)
def test_the_endpoint_that_joining_connects_to(address, endpoint):
    assert gcs_endpoint(address) == endpoint


def test_a_closed_port_is_refused_at_once_naming_the_address(closed_port):
    started = time.monotonic()
    with pytest.raises(
        ClusterUnreachable,
        match=(
            rf"cannot join the Ray cluster at 127\.0\.0\.1:{closed_port}: nothing accepted a connection within "
            rf"5 s \(.*\); check ray.address or RAY_ADDRESS, or raise ray.connect_timeout_s"
        ),
    ):
        probe_cluster(f"127.0.0.1:{closed_port}", 5.0, "ray.connect_timeout_s")
    assert time.monotonic() - started < 5.0


def test_a_run_at_an_unreachable_address_exits_6_before_ray_init(closed_port, monkeypatch, capsys):
    def reached(*args, **kwargs):
        raise AssertionError("ray.init was called for an address that nothing answers at")

    cfg = config_from_dict({"ray": {"address": f"127.0.0.1:{closed_port}", "connect_timeout_s": 3}})
    monkeypatch.setattr(ray, "init", reached)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.skip("an earlier test left Ray up: init_ray would not join")
    # main's own parsing and validation are covered elsewhere; here its `run` starts as a run does, with init_ray.
    monkeypatch.setattr(apo_ray.train, "load_config", lambda path, overrides: cfg)
    monkeypatch.setattr(apo_ray.train, "prepare", lambda cfg, resume: cfg)
    monkeypatch.setattr(apo_ray.train, "run", init_ray)
    assert apo_ray.train.main(["--config", "unused.yaml"]) == 6
    assert f"cannot join the Ray cluster at 127.0.0.1:{closed_port}" in capsys.readouterr().err
