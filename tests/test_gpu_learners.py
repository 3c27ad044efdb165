"""benchmarks/gpu_learners.py: the learners run in-process, as plain classes, without Ray or vLLM. Here its CPU
check (tiny shape, every arm); on a CUDA machine (`gpu` mark) the same arms on the GPU in bfloat16."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def run_script(tmp_path, *args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_learners", "--out", str(tmp_path), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "gpu_learners.json").read_text())["results"]["arms"]


def check_arms(arms: list[dict], device: str, ds_dtype: str) -> None:
    assert [a["arm"] for a in arms] == ["torch", "zero2", "zero3"]
    for arm in arms:
        assert arm["device"] == device and arm["tokens_per_s"] > 0 and arm["saved_equals_trained"], arm
        assert not arm["imported_ray"] and not arm["imported_vllm"], arm
    assert [a["dtype"] for a in arms] == ["torch.float32", ds_dtype, ds_dtype]
    # The gathered save is the point of the ZeRO-3 arm: its weights really are partitioned.
    assert [a["partitioned"] for a in arms] == [False, False, True]


def test_the_cpu_check_steps_and_saves_every_arm_without_ray(tmp_path):
    check_arms(run_script(tmp_path, "--cpu-check"), "cpu", "torch.float32")


@pytest.mark.gpu
def test_the_arms_step_and_save_on_a_gpu_in_bfloat16(tmp_path):
    arms = run_script(tmp_path, "--shape", "tiny")
    check_arms(arms, "cuda", "torch.bfloat16")
    assert all(a["peak_gib"] > 0 for a in arms)
