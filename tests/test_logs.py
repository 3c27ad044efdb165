"""Logging: by default apo-ray's own INFO lines and no third-party chatter, in the driver and in the actors;
`--verbose` shows everything."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from apo_ray import logs
from tests.conftest import REPO_ROOT, SMALL_EVAL

THIRD_PARTY = ("vllm.engine", "ray._private.worker", "DeepSpeed")


@pytest.fixture
def fresh_logging(monkeypatch):
    """The logging state of a process that has not configured it yet (other tests run `main` in this one), and
    what configure_logging changes process-wide put back afterwards: environment, loggers, warning filters."""
    for key in (logs.VERBOSE_ENV, *logs.QUIET_ENV):
        monkeypatch.setenv(key, "")  # recorded, so that what configure_logging sets is undone too
        monkeypatch.delenv(key)
    root = logging.getLogger()
    named = [logging.getLogger(name) for name in (*logs.OWN_LOGGERS, *logs.QUIET_LOGGERS)]
    saved_root = (list(root.handlers), root.level)
    saved = [(logger, logger.level, list(logger.filters)) for logger in named]
    for logger in named:
        logger.setLevel(logging.NOTSET)
        logger.filters.clear()
    with warnings.catch_warnings():
        yield
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for logger, level, filters in saved:
        logger.setLevel(level)
        logger.filters[:] = filters


def emit_one_of_each() -> None:
    logging.getLogger("apo_ray.driver").info("[round 1/3] generate")
    logging.getLogger("apo_ray.actors.rollout").debug("engine detail")
    logging.getLogger("apo_ray.build_locks").warning("a lock to delete")
    for name in THIRD_PARTY:
        logging.getLogger(name).warning(f"{name} note")
    logging.getLogger("some_library").warning("some_library note")


def test_by_default_apo_ray_info_shows_as_progress_and_vllm_ray_deepspeed_only_errors(fresh_logging, capsys):
    logs.configure_logging(verbose=False)
    emit_one_of_each()
    printed = capsys.readouterr()
    assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d:\d\d \[round 1/3\] generate\n", printed.out), printed.out
    problems = printed.err.splitlines()
    assert len(problems) == 2, problems
    assert problems[0].endswith(" WARNING apo_ray.build_locks: a lock to delete"), problems
    assert problems[1].endswith(" WARNING some_library: some_library note"), problems
    assert all(logging.getLogger(name).isEnabledFor(logging.ERROR) for name in THIRD_PARTY)


def test_by_default_the_libraries_read_quiet_settings_at_import_and_actors_get_them(fresh_logging):
    logs.configure_logging(verbose=False)
    assert {key: os.environ[key] for key in logs.QUIET_ENV} == logs.QUIET_ENV
    assert logs.worker_env() == logs.QUIET_ENV
    assert not logs.is_verbose()
    assert logs.ray_init_options()["logging_level"] == logging.ERROR


def test_a_setting_the_user_made_is_kept_and_passed_on(fresh_logging, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    logs.configure_logging(verbose=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert logs.worker_env()["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_deepspeed_stays_quiet_when_its_import_resets_its_level(fresh_logging, capsys):
    logs.configure_logging(verbose=False)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # what `import deepspeed` does
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
    assert capsys.readouterr().err == ""


def test_by_default_future_warnings_from_libraries_are_hidden_and_apo_rays_shown(fresh_logging):
    logs.configure_logging(verbose=False)
    with warnings.catch_warnings(record=True) as shown:
        for module in ("vllm.triton_utils.dispatcher", "apo_ray.modeling", "apo_ray.actors.rollout"):
            warnings.warn_explicit(f"deprecated in {module}", FutureWarning, "file.py", 1, module=module)
    assert [str(w.message) for w in shown] == ["deprecated in apo_ray.modeling", "deprecated in apo_ray.actors.rollout"]


def test_verbose_shows_apo_ray_debug_and_leaves_the_libraries_alone(fresh_logging, capsys):
    logs.configure_logging(verbose=True)
    emit_one_of_each()
    printed = capsys.readouterr()
    assert "DEBUG apo_ray.actors.rollout: engine detail" in printed.out, printed
    assert "WARNING some_library: some_library note" in printed.err, printed
    # Left to configure themselves (once imported, Ray and DeepSpeed print through handlers of their own).
    assert all(logging.getLogger(name).level == logging.NOTSET for name in logs.QUIET_LOGGERS)
    assert not any(logging.getLogger(name).filters for name in logs.QUIET_LOGGERS)
    assert not any(key in os.environ for key in logs.QUIET_ENV)
    assert logs.worker_env() == {logs.VERBOSE_ENV: "1"}
    assert logs.ray_init_options()["logging_level"] == logging.INFO


def test_configured_twice_each_line_appears_once(fresh_logging, capsys):
    logs.configure_logging(verbose=False)
    logs.configure_logging(verbose=False)
    logging.getLogger("apo_ray.train").info("summary: {}")
    assert capsys.readouterr().out.count("summary: {}") == 1


# Lines a Ray Train job's workers print, as Ray's worker logger writes them (ray_constants.LOGGER_FORMAT).
RAY_TRAIN_WORKER_LINES = [
    "2026-06-01 12:00:01,204\tWARNING placement_group_cleaner.py:85 -- Failed to query Ray Train Controller actor "
    "state. State API may be temporarily unavailable. Continuing to monitor.",
    "2026-06-01 12:00:02,311\tWARNING placement_group_cleaner.py:121 -- Detected that the Ray Train controller actor "
    "(4f2a) is dead. Cleaning up placement group = [9c1e] created by this run.",
    "2026-06-01 12:00:02,312\tERROR worker.py:412 -- RuntimeError: a worker failed",
]


@pytest.mark.parametrize("verbose, printed", [(False, RAY_TRAIN_WORKER_LINES[1:]), (True, RAY_TRAIN_WORKER_LINES)])
def test_the_driver_drops_ray_trains_controller_query_line_unless_verbose(verbose, printed):
    """Ray's driver passes what its workers print through a deduplicator, which reads its skip pattern when ray is
    imported: after configure_logging, in a process of its own as an `apo-ray rm` driver is."""
    script = (
        f"from apo_ray import logs; logs.configure_logging(verbose={verbose})\n"
        "import json, sys\n"
        "from ray._private.ray_logging import stderr_deduplicator\n"
        "batch = {'ip': '127.0.0.1', 'pid': 7, 'is_err': True, 'lines': json.load(sys.stdin)}\n"
        "print(json.dumps([line for out in stderr_deduplicator.deduplicate(batch) for line in out['lines']]))\n"
    )
    inherited = (logs.VERBOSE_ENV, *logs.QUIET_ENV)
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(RAY_TRAIN_WORKER_LINES),
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if k not in inherited},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == printed


@pytest.mark.parametrize("flags", [[], ["--verbose"]])
def test_the_stage_commands_configure_logging_as_train_does(fresh_logging, flags, capsys):
    from apo_ray.stages.cli import main as stage_main

    assert stage_main("rm", flags) == 2  # no base_model: refused before Ray starts, logging configured first
    assert "base_model: required" in capsys.readouterr().err
    assert logs.is_verbose() == bool(flags)
    assert ("RAY_DEDUP_LOGS_SKIP_REGEX" in os.environ) == (not flags)


def test_the_worker_hook_configures_a_worker_as_its_driver_chose(fresh_logging, monkeypatch):
    hook = logs.ray_init_options()["runtime_env"]["worker_process_setup_hook"]
    module, _, name = hook.rpartition(".")
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")  # as actor_env passes it from a verbose driver
    getattr(importlib.import_module(module), name)()
    assert logging.getLogger("apo_ray").level == logging.DEBUG
    monkeypatch.delenv(logs.VERBOSE_ENV)
    getattr(importlib.import_module(module), name)()
    assert logging.getLogger("apo_ray").level == logging.INFO
    assert logging.getLogger("vllm").level == logging.ERROR


# One round of the builtin task, small, with vLLM (whose chatter is the most) and plain torch learners.
SMALL_VLLM_RUN = [
    "rounds=1",
    "rollout.backend=vllm",
    "learner.backend=torch",
    "samples_per_prompt=2",
    "data.builtin.n_pairs=48",
    "data.builtin.n_gold=16",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=32",
    "reward.initial_epochs=1",
    "policy.epochs_per_round=1",
    "logging.tensorboard=false",
    "logging.report=false",
    *SMALL_EVAL,
]
# vLLM's own line format: "INFO 12-01 22:08:36 [inplace.py:91] Reloading weights inplace..."
VLLM_LINE = re.compile(r"\b(DEBUG|INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[\w+\.py:\d+\]")
THIRD_PARTY_BARS = ("Writing model shards", "Loading weights", "Loading safetensors checkpoint shards")


def train_output(tmp_path, *flags: str) -> str:
    # Without the settings an in-process `main` of another test left in this process's environment.
    inherited = ("RAY_ADDRESS", logs.VERBOSE_ENV, *logs.QUIET_ENV)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "apo_ray.train",
            "--config",
            "configs/default.yaml",
            f"run_dir={tmp_path / 'run'}",
            *SMALL_VLLM_RUN,
            *flags,
        ],
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if k not in inherited},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@pytest.mark.integration
def test_a_default_run_shows_apo_rays_lines_and_hides_the_libraries(tmp_path):
    output = train_output(tmp_path)
    assert "[round 1/1] sync" in output and re.search(r"\[round 1\] rm/acc=\d", output), output[-3000:]
    # Logged in the actors, configured by the job's worker set-up hook, passed on by Ray to the driver.
    assert re.search(r"\(RewardLearner pid=\d+\).* \[rm_step\] done: ", output), output[-3000:]
    assert not VLLM_LINE.search(output), VLLM_LINE.search(output)
    for noise in (
        *THIRD_PARTY_BARS,
        "Chat template warmup failed",
        "Traceback",
        "Started a local Ray instance",
        "Setting accelerator to CPU",
    ):
        assert noise not in output, noise


@pytest.mark.integration
def test_a_verbose_run_shows_the_libraries_lines(tmp_path):
    output = train_output(tmp_path, "--verbose")
    assert "Reloading weights inplace" in output and VLLM_LINE.search(output), output[-3000:]
    assert "Writing model shards" in output and "Started a local Ray instance" in output, output[-3000:]
    assert re.search(r"\[round 1\] rm/acc=\d", output), output[-3000:]
