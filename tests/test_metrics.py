import json
import math
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from apo_ray.metrics import METRICS_FILE, MetricsLogger, prometheus_name, read_metrics_jsonl


def _jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_jsonl_has_one_row_per_log_call(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"round": 1, "rm/acc": 0.75}, step=1)
        logger.log({"policy/kl": 0.125}, step=2)
    assert _jsonl_rows(tmp_path) == [{"step": 1, "round": 1, "rm/acc": 0.75}, {"step": 2, "policy/kl": 0.125}]


def test_jsonl_line_is_on_disk_before_close(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False)
    logger.log({"rm/loss": 0.5}, step=1)
    assert _jsonl_rows(tmp_path) == [{"step": 1, "rm/loss": 0.5}]
    logger.close()


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False) as logger:
        logger.log({"rm/loss": math.nan, "policy/kl": math.inf}, step=1)
    assert _jsonl_rows(tmp_path) == [{"step": 1, "rm/loss": None, "policy/kl": None}]


def test_non_numeric_metric_is_rejected_before_anything_is_written(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False) as logger:
        with pytest.raises(TypeError, match="'rm/acc'"):
            logger.log({"rm/loss": 0.5, "rm/acc": "high"}, step=1)
        with pytest.raises(ValueError, match="reserved"):
            logger.log({"step": 3}, step=1)
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_truncate_after_drops_later_steps_and_keeps_appending(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False) as logger:
        for step in (1, 2, 3):
            logger.log({"rm/acc": step / 10}, step=step)
    # a resumed run reopens the directory and rolls back to its last complete step
    with MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False) as logger:
        logger.truncate_after(1)
        logger.log({"rm/acc": 0.9}, step=2)
    assert _jsonl_rows(tmp_path) == [{"step": 1, "rm/acc": 0.1}, {"step": 2, "rm/acc": 0.9}]


def test_read_metrics_jsonl_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "rm/acc": 0.5}\n{"step": 2, "rm/a')
    assert read_metrics_jsonl(path) == [{"step": 1, "rm/acc": 0.5}]


@pytest.mark.parametrize(
    ("text", "line"),
    [('{"step": 1}\n{"step": 2, \n{"step": 3}\n', 2), ('{"step": 1}\n{"rm/acc": 0.5}\n', 2), ("[1, 2]\n", 1)],
)
def test_read_metrics_jsonl_names_file_and_line_of_a_bad_row(tmp_path, text, line):
    path = tmp_path / METRICS_FILE
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{METRICS_FILE}:{line}:"):
        read_metrics_jsonl(path)


def test_prometheus_names():
    assert prometheus_name("rm/acc") == "apo_rm_acc"
    assert prometheus_name("rollout/tokens_per_s") == "apo_rollout_tokens_per_s"
    assert prometheus_name("eval/gold-score.v2") == "apo_eval_gold_score_v2"


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_scalars_are_readable(tmp_path):
    with MetricsLogger(tmp_path, ray_metrics=False) as logger:
        logger.log({"rm/acc": 0.5, "policy/kl": 0.25}, step=1)
        logger.log({"rm/acc": 0.75}, step=2)
    assert _tensorboard_scalars(tmp_path, "rm/acc") == [(1, 0.5), (2, 0.75)]
    assert _tensorboard_scalars(tmp_path, "policy/kl") == [(1, 0.25)]


def test_tensorboard_hides_steps_dropped_by_truncate_after(tmp_path):
    with MetricsLogger(tmp_path, ray_metrics=False) as logger:
        for step in (1, 2, 3):
            logger.log({"rm/acc": step / 10}, step=step)
    with MetricsLogger(tmp_path, ray_metrics=False) as logger:
        logger.truncate_after(1)
        logger.log({"rm/acc": 0.875}, step=2)
    assert _tensorboard_scalars(tmp_path, "rm/acc") == [(1, pytest.approx(0.1)), (2, 0.875)]


def _wandb_records(run_file: Path) -> list:
    """Records of an offline .wandb file: a 7-byte file header, then LevelDB-log records of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    records, position = [], 7
    while position + 7 <= len(data):
        _checksum, length, _kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        if position + length > len(data):
            break  # a record still being written
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data[position : position + length])
        position += length
        records.append(record)
    return records


def _wandb_history(run_file: Path, timeout_s: float = 10.0) -> list[dict[str, str]]:
    # wandb's writer process may still be appending when finish() returns; its last record is "exit"
    deadline = time.monotonic() + timeout_s
    records = _wandb_records(run_file)
    while not any(record.HasField("exit") for record in records):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout_s} s"
        time.sleep(0.1)
        records = _wandb_records(run_file)
    return [
        {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
        for record in records
        if record.HasField("history")
    ]


def test_wandb_offline_writes_the_run_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with MetricsLogger(
        run_dir, tensorboard=False, ray_metrics=False, wandb_project="apo-test", config_dict={"seed": 7}
    ) as logger:
        logger.log({"rm/acc": 0.75}, step=3)
    assert time.monotonic() - started < 20
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    assert [(row["_step"], row["rm/acc"]) for row in history] == [("3", "0.75")]


def test_wandb_mode_is_validated(tmp_path):
    with pytest.raises(ValueError, match="wandb_mode"):
        MetricsLogger(tmp_path, wandb_project="apo-test", wandb_mode="offlne")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape_gauges(port: int, wanted: set[str], timeout_s: float = 30.0) -> dict[tuple[str, frozenset], float]:
    """Samples of every ray_apo_* metric on the node's Prometheus endpoint, polled until all `wanted` names appear
    (Ray exports with a delay)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    samples: dict[tuple[str, frozenset], float] = {}
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name.startswith("ray_apo_")
        }
        if wanted <= {name for name, _ in samples}:
            return samples
        time.sleep(1)
    raise AssertionError(f"metrics {sorted(wanted - {name for name, _ in samples})} not exported within {timeout_s} s")


@pytest.fixture
def ray_with_metrics_port():
    import ray

    from tests.conftest import start_test_ray

    shared = ray.is_initialized()
    if shared:
        ray.shutdown()  # the export port is fixed when the cluster starts
    port = _free_port()
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield port
    ray.shutdown()
    if shared:
        # Later tests hold session fixtures on the shared cluster: bring it back.
        start_test_ray()


@pytest.mark.integration
def test_dashboard_gauges_reach_the_prometheus_endpoint(tmp_path, ray_with_metrics_port):
    with MetricsLogger(tmp_path, tensorboard=False, run_name="scrape-test") as logger:
        logger.set_phase("rm_step")
        logger.set_phase("policy_step")
        logger.log(
            {"round": 2, "rm/acc": 0.75, "policy/kl": 0.125, "rollout/tokens_per_s": 1070.0, "rm/loss": 0.5}, step=2
        )
        # Ray prefixes application metrics with "ray_" on its endpoint
        samples = _scrape_gauges(
            ray_with_metrics_port,
            {
                "ray_apo_round",
                "ray_apo_rm_acc",
                "ray_apo_policy_kl",
                "ray_apo_rollout_tokens_per_s",
                "ray_apo_phase",
            },
        )

    def value(name: str, **tags: str) -> float:
        (found,) = [v for (n, labels), v in samples.items() if n == name and set(tags.items()) <= labels]
        return found

    run = {"run": "scrape-test"}
    assert value("ray_apo_round", **run) == 2
    assert value("ray_apo_rm_acc", **run) == 0.75
    assert value("ray_apo_policy_kl", **run) == 0.125
    assert value("ray_apo_rollout_tokens_per_s", **run) == 1070.0
    assert value("ray_apo_phase", phase="policy_step", **run) == 1
    assert value("ray_apo_phase", phase="rm_step", **run) == 0
    # only the dashboard set is exported, not every logged key
    assert not any(name == "ray_apo_rm_loss" for name, _ in samples)
