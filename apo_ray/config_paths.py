"""Where the relative paths of a config point, decided once when it loads.

- Inputs (`data.*.path`, `data.chat_template` when a file, `model.policy_path`, `model.reward_path`,
  `model.eval_reward`, `aapa.discriminator_path`) written in a config file are read from the file's directory, so
  a config and its data travel together: from any working directory, and under `ray job submit --working-dir`,
  whose job runs in an uploaded copy of that directory.
  Given on the command line (`key=value`), they are read from the working directory, like any shell argument.
- Outputs (`run_dir`, `data.builtin.cache_dir`) are relative to the working directory, as before.

Every local input comes out absolute, so the saved `config.yaml` of a run means the same from anywhere
(`--resume`). Model paths and `format: hf` data may also be hub names (`Qwen/Qwen2.5-0.5B-Instruct`): a value
of that form that is not a path beside its base stays a name; `./` or `../` forces a path. A model may also be a
GGUF file, or a file of an installed package (`pkg:`, apo_ray.package_files), which stays as written
(apo_ray.model_sources converts both before Ray starts).
"""

from __future__ import annotations

import os
from pathlib import Path

from apo_ray.config import ConfigError
from apo_ray.data import _HF_FILE_BUILDERS, is_hub_name
from apo_ray.package_files import PREFIX, is_package_file

DATA_SOURCES = ("source", "pairs", "gold", "prompts", "eval_pairs")
MODEL_KEYS = ("policy_path", "reward_path", "eval_reward")
# Model "paths" that name something apo-ray provides.
MODEL_KEYWORDS = ("builtin", "gold")
FORCED_PATH = ("./", "../")
# Data formats whose path may also be a hub dataset name.
HUB_FORMATS = ("hf", "hh")


def dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    """{"a.b", "c"} for {"a": {"b": 1}, "c": 2}: the keys a tree of overrides sets."""
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= dotted_keys(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
    return keys


def _absolute(value: str, base: Path) -> tuple[Path, bool]:
    """(the absolute path `value` names from `base`, whether it was written absolute or from home)."""
    path = Path(value).expanduser()
    return (path, True) if path.is_absolute() else (Path(os.path.abspath(base / path)), False)


def data_path(value: str, base: Path, data_format: str) -> str:
    path, written_absolute = _absolute(value, base)
    # jsonl reads local files only; hf and hh also take hub dataset names (but not data files: those are paths).
    is_name = data_format in HUB_FORMATS and is_hub_name(value) and Path(value).suffix.lower() not in _HF_FILE_BUILDERS
    if is_name and not written_absolute and not value.startswith(FORCED_PATH) and not path.exists():
        return value
    return str(path)


def model_path(value: str, base: Path, key: str, base_name: str) -> str:
    if value in MODEL_KEYWORDS or is_package_file(value):
        return value
    path, written_absolute = _absolute(value, base)
    if written_absolute or value.startswith(FORCED_PATH) or path.exists():
        return str(path)
    if is_hub_name(value):
        return value
    raise ConfigError(
        f"{key}: {value!r} is neither an existing directory or GGUF file, a {PREFIX} file, nor a hub "
        f"model name (org/name); relative paths are read from {base_name}, {base}"
    )


def resolve_paths(tree: dict, file_base: Path | None, overridden: set[str]) -> None:
    """Make the input paths of a merged config tree absolute, in place (see the module docstring).

    `file_base`: the config file's directory (None without a file); `overridden`: the dotted keys that came
    from the command line. Values of the wrong type are left for the config's own checks to name.
    """

    def base_of(key: str) -> tuple[Path, str]:
        if key in overridden or file_base is None:
            return Path.cwd(), "the working directory"
        return file_base, "the config file's directory"

    data = tree.get("data")
    for name in DATA_SOURCES if isinstance(data, dict) else ():
        source = data.get(name)
        if isinstance(source, dict) and isinstance(source.get("path"), str) and source["path"]:
            base, _ = base_of(f"data.{name}.path")
            source["path"] = data_path(source["path"], base, source.get("format", "jsonl"))
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, str) and template not in ("auto", "none", ""):
        base, _ = base_of("data.chat_template")
        data["chat_template"] = str(_absolute(template, base)[0])
    model = tree.get("model")
    for name in MODEL_KEYS if isinstance(model, dict) else ():
        if isinstance(model.get(name), str) and model[name]:
            key = f"model.{name}"
            base, base_name = base_of(key)
            model[name] = model_path(model[name], base, key, base_name)
    aapa = tree.get("aapa")
    # "reward" names the run's own RM architecture, not a path.
    if (
        isinstance(aapa, dict)
        and isinstance(aapa.get("discriminator_path"), str)
        and aapa["discriminator_path"] not in ("", "reward")
    ):
        base, base_name = base_of("aapa.discriminator_path")
        aapa["discriminator_path"] = model_path(aapa["discriminator_path"], base, "aapa.discriminator_path", base_name)


# The inputs of a stage config (apo-ray sft / rm): data sections and the model it starts from.
STAGE_DATA_SECTIONS = ("train", "eval")


def resolve_stage_paths(tree: dict, file_base: Path | None, overridden: set[str]) -> None:
    """resolve_paths for a stage config's `train.path`, `eval.path`, `chat_template` (a file) and `base_model`, by
    the same rule."""
    for section in STAGE_DATA_SECTIONS:
        source = tree.get(section)
        if isinstance(source, dict) and isinstance(source.get("path"), str) and source["path"]:
            base = Path.cwd() if f"{section}.path" in overridden or file_base is None else file_base
            source["path"] = data_path(source["path"], base, source.get("format", "jsonl"))
    template = tree.get("chat_template")
    if isinstance(template, str) and template not in ("auto", "none", ""):
        base = Path.cwd() if "chat_template" in overridden or file_base is None else file_base
        tree["chat_template"] = str(_absolute(template, base)[0])
    if isinstance(tree.get("base_model"), str) and tree["base_model"]:
        from_file = "base_model" not in overridden and file_base is not None
        base, base_name = (
            (file_base, "the config file's directory") if from_file else (Path.cwd(), "the working directory")
        )
        tree["base_model"] = model_path(tree["base_model"], base, "base_model", base_name)


def _sources(data_cfg) -> list[tuple[str, object]]:
    return [(name, getattr(data_cfg, name)) for name in DATA_SOURCES if getattr(data_cfg, name) is not None]


def all_sources_local(data_cfg) -> bool:
    """Whether every data source is on this machine (no hub dataset to fetch)."""
    return all(src.format not in HUB_FORMATS or os.path.exists(src.path) for _, src in _sources(data_cfg))


def _model_input(key: str, value: str) -> str:
    """What a model value is, in the dry run's words."""
    from apo_ray.model_sources import describe

    described = describe(value, key)
    if described:
        return described
    if value == "builtin":
        return "the builtin task's model, made at start-up"
    if value == "gold":
        return "the builtin task's oracle"
    if os.path.isdir(value):
        return "local model directory"
    return "hub model name: its form is checked, it is fetched at start-up"


def input_paths(cfg) -> list[tuple[str, str, str]]:
    """(key, value, what it is) of every input a run reads, as resolved; for the dry run's printout."""
    rows = []
    if cfg.data.task == "builtin":
        cache = os.path.abspath(cfg.data.builtin.cache_dir)
        rows.append(("data.builtin.cache_dir", cache, "the builtin task's models are made here at start-up"))
    for name, src in _sources(cfg.data):
        local = os.path.exists(src.path)
        what = (
            (f"{src.format} file" if os.path.isfile(src.path) else f"{src.format} directory")
            if local
            else "hub dataset name: its form is checked, it is fetched at start-up"
        )
        rows.append((f"data.{name}.path", src.path, what))
    models = [(f"model.{name}", getattr(cfg.model, name)) for name in MODEL_KEYS]
    if cfg.aapa.enabled and cfg.aapa.discriminator_path != "reward":
        models.append(("aapa.discriminator_path", cfg.aapa.discriminator_path))
    for key, value in models:
        rows.append((key, value, _model_input(key, value)))
    return rows
