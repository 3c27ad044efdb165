"""Model values that are files rather than Hugging Face directories or hub names: a GGUF file (apo_ray.gguf),
named by its path or as a file of an installed package (`pkg:`, apo_ray.package_files).

Such a value is checked when the config loads (the package is installed, the file is a GGUF transformers
converts), and becomes a Hugging Face directory on the driver before Ray starts (`with_local_models`), so every
actor, DeepSpeed and vLLM read a plain directory and none of them converts.

A run's saved config.yaml keeps the value as the user wrote it, not the converted directory: `--resume` resolves
it again, which finds the same cache entry (it is keyed by the file's content) and still works where the
cache was cleared, or in another environment whose package lives elsewhere. The converted directory is a cache,
not part of the run.
"""

from __future__ import annotations

from pathlib import Path

from apo_ray.config_paths import MODEL_KEYWORDS
from apo_ray.gguf import cached_dir, check_gguf, hf_dir_from_gguf
from apo_ray.package_files import is_package_file, package_file

# aapa.discriminator_path's "reward": the run's own RM.
KEYWORDS = (*MODEL_KEYWORDS, "reward")
# The game's model keys: (section, field).
GAME_MODEL_KEYS = (
    ("model", "policy_path"),
    ("model", "reward_path"),
    ("model", "eval_reward"),
    ("aapa", "discriminator_path"),
)


def local_path(value: str, key: str) -> Path:
    """The path a model value names on this machine (a `pkg:` value's file), whether or not it exists."""
    return package_file(value, key) if is_package_file(value) else Path(value).expanduser()


def names_a_file(value: str) -> bool:
    """Whether a model value names a file, maybe inside a package, rather than a directory, a hub name or a
    keyword."""
    return is_package_file(value) or (value not in KEYWORDS and Path(value).expanduser().is_file())


def loadable_path(value: str, key: str) -> str:
    """What a model loader reads for `value`: a GGUF file converted (once; cached), a `pkg:` directory's path,
    anything else unchanged."""
    if not names_a_file(value):
        return value
    path = local_path(value, key)
    return hf_dir_from_gguf(path, key) if path.is_file() else str(path)


def describe(value: str, key: str) -> str | None:
    """For the dry run: what a `pkg:` or GGUF value resolves to; None for other values."""
    if not names_a_file(value):
        return None
    path = local_path(value, key)
    if not path.is_file():
        return f"{path}, a directory of an installed package"
    header = check_gguf(path, key)
    target = cached_dir(path)
    state = "converted already" if (target / "config.json").is_file() else "converted at start-up, about 30 s"
    return f"GGUF file {path} ({header.architecture}): read as the Hugging Face directory {target} ({state})"


def with_local_models(cfg):
    """A copy of the game config `cfg` whose model keys name what the actors load (see `loadable_path`)."""
    updates = {}
    for section, name in GAME_MODEL_KEYS:
        value = getattr(getattr(cfg, section), name)
        loadable = loadable_path(value, f"{section}.{name}")
        if loadable != value:
            updates.setdefault(section, {})[name] = loadable
    return cfg.model_copy(
        update={section: getattr(cfg, section).model_copy(update=fields) for section, fields in updates.items()}
    )


def stage_with_local_model(cfg):
    """A copy of a stage config whose base_model is what its workers load."""
    return cfg.model_copy(update={"base_model": loadable_path(cfg.base_model, "base_model")})
