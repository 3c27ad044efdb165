"""The builtin task's models built once per settings and cached on disk (see apo_ray.builtin)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from apo_ray.builtin.models import (
    TinyModelSpec,
    make_policy_model,
    make_reward_model,
    make_tokenizer,
    sft_initial_policy,
)
from apo_ray.builtin.task import make_sft_data

# ---------------------------------------------------------------------------------------- cached assets


@dataclass(frozen=True)
class BuiltinAssets:
    policy_dir: Path  # SFT'd initial policy (also the reference model)
    reward_dir: Path  # untrained, randomly initialised RM
    tokenizer_dir: Path


def default_cache_dir() -> Path:
    """$APO_RAY_CACHE, else ~/.cache/apo_ray."""
    return Path(os.environ.get("APO_RAY_CACHE", Path.home() / ".cache" / "apo_ray"))


def _assets_key(settings: dict[str, object]) -> str:
    # The package's source is part of the key, so any change to the task or models rebuilds the cache.
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def prepare_builtin_assets(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    n_sft: int = 4096,
    sft_steps: int = 500,
    sft_lr: float = 1e-3,
    spec: TinyModelSpec = TinyModelSpec(),
) -> BuiltinAssets:
    """Build tokenizer, SFT policy and RM once per settings and cache them under ``cache_dir``.

    Safe when several processes call it at once: each builds in a private temporary directory and the
    first to finish renames it into place; the others discard theirs. Not for threads of one process:
    transformers' ``from_pretrained`` is not thread-safe (concurrent loads left weights on the meta device).
    """
    settings = {"seed": seed, "n_sft": n_sft, "sft_steps": sft_steps, "sft_lr": sft_lr, "spec": asdict(spec)}
    final_dir = cached_build(
        cache_dir, "builtin", settings, lambda build_dir: _build_assets(build_dir, seed, n_sft, sft_steps, sft_lr, spec)
    )
    return BuiltinAssets(
        policy_dir=final_dir / "policy", reward_dir=final_dir / "reward", tokenizer_dir=final_dir / "tokenizer"
    )


_COMPLETE_MARKER = "settings.json"


def cached_build(
    cache_dir: str | Path | None, name: str, settings: dict[str, object], build: Callable[[Path], None]
) -> Path:
    """`<cache_dir>/<name>-<key of settings and sources>`, made by `build(directory)` unless already complete.

    Safe when several processes call it at once: each builds in a private temporary directory and the first to
    finish renames it into place; the others discard theirs."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final_dir = cache_dir / f"{name}-{_assets_key(settings)}"
    if not _is_complete(final_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
        try:
            build(build_dir)
            # Written last: its presence marks a complete build.
            (build_dir / _COMPLETE_MARKER).write_text(json.dumps(settings, indent=2))
            publish_build(build_dir, final_dir)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return final_dir


def _is_complete(build: Path) -> bool:
    return (build / _COMPLETE_MARKER).exists()


def publish_build(build_dir: Path, final_dir: Path) -> None:
    """Atomically rename a finished build to ``final_dir``, unless a complete one is already there."""
    try:
        os.replace(build_dir, final_dir)
    except OSError:
        # Renaming onto a non-empty directory fails: another process published first; keep its build.
        if not _is_complete(final_dir):
            raise


def _build_assets(root: Path, seed: int, n_sft: int, sft_steps: int, sft_lr: float, spec: TinyModelSpec) -> None:
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    make_policy_model(root / "policy", tokenizer, spec, seed=seed)
    sft_initial_policy(root / "policy", make_sft_data(seed, n_sft), steps=sft_steps, lr=sft_lr, seed=seed)
    make_reward_model(root / "reward", tokenizer, spec, seed=seed)
