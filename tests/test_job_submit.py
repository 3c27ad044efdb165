"""`ray job submit` of a training run to a real head node on loopback, the flow docs/cluster.md describes.

The head runs with token authentication (RAY_AUTH_MODE=token) and a token of its own (RAY_AUTH_TOKEN_PATH),
in a temp dir of its own, and is stopped by signalling its `ray start --block` process: `ray stop` would
stop every Ray cluster on the machine, not only this one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUILTIN_CACHE = REPO_ROOT / ".cache" / "apo_ray_builtin"
# One round of the builtin task, small, with the HF rollout engine and plain torch learners: the test is
# about the job plumbing, and vLLM/DeepSpeed start-up would double its time.
SMALL_RUN = [
    "rounds=1",
    "rollout.backend=hf",
    "learner.backend=torch",
    "samples_per_prompt=2",
    "data.builtin.n_pairs=64",
    "data.builtin.n_gold=16",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=32",
    "reward.initial_epochs=1",
    "policy.epochs_per_round=1",
    "logging.tensorboard=false",
    # The job runs in an unpacked copy of the working dir, where a relative cache dir would be empty.
    f"data.builtin.cache_dir={BUILTIN_CACHE}",
]
DASHBOARD_GAUGES = {
    "ray_apo_round",
    "ray_apo_rm_acc",
    "ray_apo_eval_gold_score",
    "ray_apo_eval_kl",
    "ray_apo_rollout_tokens_per_s",
    "ray_apo_timing_sync",
    "ray_apo_phase",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Head:
    dashboard_url: str
    metrics_port: int
    token: str
    env: dict[str, str]
    temp_dir: Path

    def get_json(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        return json.loads(urllib.request.urlopen(request, timeout=10).read())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"{what} within {timeout_s} s")


# One head for the module: starting it (its dashboard and job agent) takes as long as a test's own work, and
# neither test changes it.
@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray's unix sockets live under it and must stay under 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="apo-head-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # The job's `python` is the one first on the head's PATH.
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)
    )
    dashboard_port, metrics_port = free_port(), free_port()
    log_file = temp_dir / "head.log"
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={metrics_port}",
                "--num-cpus=4",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                '--system-config={"metrics_report_interval_ms": 1000}',
            ],
            env=env,
            cwd=temp_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    head = Head(f"http://127.0.0.1:{dashboard_port}", metrics_port, token, env, temp_dir)
    try:
        try:
            wait_for(
                lambda: process.poll() is None and head.get_json("/api/version"), 120, "the dashboard did not answer"
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; head log:\n{log_file.read_text()[-3000:]}") from None
        yield head
    finally:
        # `ray start --block` stops the node's processes when it gets SIGTERM.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def scrape_apo_metrics(port: int) -> set[str]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith("ray_apo_")}


def submit_job(head: Head, job_id: str, entrypoint: list[str]) -> None:
    """`ray job submit --no-wait`, retried while the head's job agent is still registering."""
    command = [
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--submission-id",
        job_id,
        "--no-wait",
        "--working-dir",
        str(REPO_ROOT),
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + 120
    while True:
        submitted = head.ray(*command)
        if submitted.returncode == 0:
            return
        if "No available agent" not in submitted.stderr + submitted.stdout or time.monotonic() > deadline:
            raise AssertionError(f"ray job submit failed: {submitted.stdout}{submitted.stderr}")
        time.sleep(2)


@pytest.mark.integration
def test_ray_job_submit_runs_the_game_on_an_existing_cluster(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    job_id = f"apo-ray-test-{secrets.token_hex(4)}"
    submit_job(
        ray_head,
        job_id,
        ["python", "-m", "apo_ray.train", "--config", "configs/default.yaml", f"run_dir={run_dir}", *SMALL_RUN],
    )
    # While the job runs: its gauges reach the node's Prometheus endpoint, and its actors are named.
    exported: set[str] = set()
    actor_names: set[str] = set()
    status = "PENDING"
    deadline = time.monotonic() + 300
    while status in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        try:
            exported |= scrape_apo_metrics(ray_head.metrics_port)
            actors = ray_head.get_json("/api/v0/actors?limit=1000&detail=false")["data"]["result"]["result"]
            actor_names |= {a["name"] for a in actors if a.get("name")}
            status = ray_head.get_json(f"/api/jobs/{job_id}")["status"]
        except OSError:
            pass
        time.sleep(2)
    logs = ray_head.ray("job", "logs", "--address", ray_head.dashboard_url, job_id)
    assert status == "SUCCEEDED", logs.stdout[-3000:]
    # The job's log is a file: generation reports one plain line per call, no redrawn progress bar.
    assert re.search(r"\[generate\] done: (\d+)/\1 samples in [\d.]+ s", logs.stdout), logs.stdout[-3000:]
    # The actors log as the driver does on a cluster it joined (the job's worker set-up hook): their progress
    # lines, and no transformers bar from their checkpoint saves.
    assert re.search(r"\(RewardLearner pid=\d+(, ip=[\d.]+)?\).* \[rm_step\] done: ", logs.stdout), logs.stdout[-3000:]
    assert "Writing model shards" not in logs.stdout, logs.stdout[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "1"
    assert (run_dir / "checkpoints" / "round_0001" / "policy" / "config.json").is_file()
    assert (run_dir / "summary.json").is_file() and (run_dir / "report").is_dir()

    assert DASHBOARD_GAUGES <= exported, f"exported: {sorted(exported)}"
    # One run id ties the run's actors together on the dashboard.
    named = {
        re.fullmatch(r"(policy-learner|reward-learner|reference|rollout)-([0-9a-f]{6})(-0)?", name)
        for name in actor_names
    } - {None}
    assert {m.group(1) for m in named} == {"policy-learner", "reward-learner", "reference", "rollout"}, actor_names
    assert len({m.group(2) for m in named}) == 1, actor_names


@pytest.mark.integration
def test_a_run_without_an_address_starts_its_own_cluster_beside_a_ray_start_one(ray_head):
    # The address file a `ray start` with the default temp dir leaves, where a bare ray.init() looks first
    # (under $RAY_TMPDIR/ray): it would join the head and be refused num_cpus. `ray start` writes it only after
    # its dashboard answers.
    address_file = ray_head.temp_dir / "ray_current_cluster"
    head_gcs = wait_for(
        lambda: address_file.is_file() and address_file.read_text().strip(), 120, f"{address_file} was not written"
    )
    # Short: the local cluster's unix sockets go under it too.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="apo-drv-", dir="/tmp"))
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(head_gcs)
    driver = (
        "import json, ray\n"
        "from apo_ray.cluster import init_ray\n"
        "from apo_ray.config import load_config\n"
        f"init_ray(load_config({str(REPO_ROOT / 'configs' / 'default.yaml')!r}))\n"
        "print('GCS', json.dumps(ray.get_runtime_context().gcs_address))\n"
        "ray.shutdown()\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", driver],
            env={**ray_head.env, "RAY_TMPDIR": str(ray_tmpdir)},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs = json.loads(done.stdout.split("GCS ", 1)[1].splitlines()[0])
    assert gcs and gcs != head_gcs
