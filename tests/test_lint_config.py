"""The pre-commit hooks and `make lint` run the same ruff: the hooks' pin is the dev extra's."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_hooks_pin_the_ruff_of_the_dev_extra():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    ruff = [requirement for requirement in dev if requirement.startswith("ruff==")]
    hooks = [
        hook
        for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
        for hook in repo["hooks"]
    ]
    assert len(ruff) == 1 and {hook["id"] for hook in hooks} == {"ruff-check", "ruff-format"}
    assert all(hook["additional_dependencies"] == ruff for hook in hooks)
