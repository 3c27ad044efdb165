"""Which models `apo-ray serve` deploys: the policy and the RM found in the directories it is given.

A target is one of
- a game run directory (`apo-ray train`): its latest round's `policy/` and `reward/`;
- a stage run directory (`apo-ray sft` / `apo-ray rm`): its `model/`;
- a round checkpoint directory holding `policy/` and/or `reward/`;
- a Hugging Face model directory: a causal LM is the policy, a sequence classifier the RM;
- a GGUF file, or a `pkg:` file of an installed package (apo_ray.package_files): the policy, converted once into
  a cached Hugging Face directory (apo_ray.gguf) before Ray starts.
Give one target with both models, or one with each. The RM's truncation length comes from the run that
trained it when the directory says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apo_ray.config import ConfigError
from apo_ray.model_sources import loadable_path

ROLES = ("policy", "reward")


@dataclass
class ServeTargets:
    policy: Path | None = None
    reward: Path | None = None
    # The RM's max_length in the run that trained it, if a run directory said.
    reward_max_length: int | None = None
    # The `serve` section of a game run's config.yaml, if one was given.
    serve_section: dict[str, Any] = field(default_factory=dict)


def model_role(model_dir: Path) -> str:
    """ "policy" for a causal LM, "reward" for a sequence classifier, from config.json's architectures."""
    config_file = model_dir / "config.json"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{model_dir}: unreadable config.json ({exc})") from None
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "policy"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "reward"
    raise ConfigError(
        f"{model_dir}: architectures {architectures} are neither a causal LM (the policy) nor a "
        "sequence classifier (the RM)"
    )


def _checkpointed_model(role_dir: Path) -> Path | None:
    """The HF model a round checkpoint holds for one role: its folder, or a LoRA learner's merged/ model
    (checkpoint.merge_lora); None where the role has neither."""
    for model_dir in (role_dir, role_dir / "merged"):
        if (model_dir / "config.json").is_file():
            return model_dir
    if (role_dir / "adapter_config.json").is_file():
        raise ConfigError(
            f"{role_dir}: a LoRA adapter without its merged model; `apo-ray serve` serves whole models "
            "(serving base plus adapter is not built): train with checkpoint.merge_lora=true"
        )
    return None


def _read_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    return loaded if isinstance(loaded, dict) else {}


def _models_of(target: Path) -> tuple[dict[str, Path], int | None, dict]:
    """(role -> model dir, RM max_length or None, serve section) of one target."""
    latest = target / "checkpoints" / "LATEST"
    run_config = target / "config.yaml"
    if latest.is_file():
        round_dir = target / "checkpoints" / f"round_{int(latest.read_text().strip()):04d}"
        config = _read_yaml(run_config) if run_config.is_file() else {}
        models, _, _ = _models_of(round_dir)
        return models, config.get("reward", {}).get("max_length"), config.get("serve") or {}
    if run_config.is_file() and (target / "model" / "config.json").is_file():
        config = _read_yaml(run_config)
        model_dir = target / "model"
        return {model_role(model_dir): model_dir}, config.get("max_length"), {}
    nested = {role: model_dir for role in ROLES if (model_dir := _checkpointed_model(target / role)) is not None}
    if nested:
        for role, model_dir in nested.items():
            if model_role(model_dir) != role:
                raise ConfigError(f"{model_dir}: holds a {model_role(model_dir)} model, not the {role}")
        return nested, None, {}
    if (target / "config.json").is_file():
        return {model_role(target): target}, None, {}
    raise ConfigError(f"{target}: not a run directory, a round checkpoint or a Hugging Face model directory")


def resolve_targets(paths: list[str]) -> ServeTargets:
    found = ServeTargets()
    for raw in paths:
        target = Path(loadable_path(raw, "apo-ray serve")).expanduser()
        if not target.is_dir():
            raise ConfigError(f"{raw}: no such directory")
        models, max_length, serve_section = _models_of(target)
        for role, model_dir in models.items():
            if getattr(found, role) is not None:
                raise ConfigError(f"{raw}: a second {role} (already serving {getattr(found, role)})")
            setattr(found, role, model_dir.resolve())
        if "reward" in models and max_length is not None:
            found.reward_max_length = max_length
        found.serve_section = found.serve_section or serve_section
    return found
