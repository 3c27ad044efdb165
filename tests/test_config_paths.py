"""Relative paths in a config file are read from the file's directory; on the command line, from the working
directory; hub names stay names; outputs stay relative to the working directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from apo_ray.config import ConfigError, load_config
from apo_ray.data import DataError, validate_sources

PAIRS = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(8))


@pytest.fixture
def project(tmp_path) -> Path:
    """A checkout as `ray job submit --working-dir` uploads it: configs/, data/ and models/ side by side."""
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text(PAIRS)
    (root / "models" / "policy").mkdir(parents=True)
    (root / "models" / "policy" / "config.json").write_text("{}")
    (root / "configs" / "models" / "rm").mkdir(parents=True)
    (root / "configs" / "models" / "rm" / "config.json").write_text("{}")
    config = {
        "run_dir": "runs/x",
        "data": {
            "task": "files",
            "source": {"path": "../data/train.jsonl"},
            "eval_pairs": {"path": "Anthropic/hh-rlhf", "format": "hf"},
        },
        # ../ forces a path; models/rm exists beside the config; the judge is a hub name.
        "model": {
            "policy_path": "../models/policy",
            "reward_path": "models/rm",
            "eval_reward": "OpenAssistant/reward-model-deberta-v3-large-v2",
        },
    }
    (root / "configs" / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_paths_in_a_config_file_are_read_from_its_directory(project, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(project / "configs" / "run.yaml")
    assert cfg.data.source.path == str(project / "data" / "train.jsonl")
    assert cfg.model.policy_path == str(project / "models" / "policy")
    assert cfg.model.reward_path == str(project / "configs" / "models" / "rm")
    assert cfg.model.eval_reward == "OpenAssistant/reward-model-deberta-v3-large-v2"
    assert cfg.data.eval_pairs.path == "Anthropic/hh-rlhf"
    # Outputs stay where the command runs.
    assert cfg.run_dir == "runs/x"


def test_a_working_dir_copy_reads_its_own_files(project, tmp_path, monkeypatch):
    # ray job submit --working-dir: the job runs in an unpacked copy, with a relative --config.
    copy = tmp_path / "ray_working_dir_copy"
    shutil.copytree(project, copy)
    shutil.rmtree(project)
    monkeypatch.chdir(copy)
    cfg = load_config("configs/run.yaml")
    assert cfg.data.source.path == str(copy / "data" / "train.jsonl")
    assert cfg.model.policy_path == str(copy / "models" / "policy")


def test_paths_on_the_command_line_are_read_from_the_working_directory(project, monkeypatch):
    monkeypatch.chdir(project / "data")
    (project / "data" / "other.jsonl").write_text(PAIRS)
    cfg = load_config(
        project / "configs" / "run.yaml", ["data.source.path=other.jsonl", "model.reward_path=../models/policy"]
    )
    assert cfg.data.source.path == str(project / "data" / "other.jsonl")
    assert cfg.model.reward_path == str(project / "models" / "policy")


def test_a_name_that_is_neither_a_path_nor_a_hub_name_names_its_key_and_base(project):
    with pytest.raises(
        ConfigError,
        match=r"model\.policy_path: 'models/a/b' is neither an existing directory or GGUF "
        rf"file, a pkg: file, nor a hub model name .*read from the config file's directory, "
        rf"{project / 'configs'}",
    ):
        load_config(_with(project, {"model": {"policy_path": "models/a/b"}}))


def test_a_missing_relative_file_is_reported_where_it_was_looked_for(project):
    with pytest.raises(ConfigError, match=rf"model\.policy_path: path does not exist: {project / 'configs' / 'gone'}"):
        load_config(_with(project, {"model": {"policy_path": "./gone"}}))
    cfg = load_config(_with(project, {"data": {"source": {"path": "nope.jsonl"}}}))
    with pytest.raises(DataError, match=rf"data\.source\.path: {project / 'configs' / 'nope.jsonl'}: file not found"):
        validate_sources(cfg.data)


def test_hf_data_files_are_paths_and_dataset_names_are_names(project):
    cfg = load_config(_with(project, {"data": {"eval_pairs": {"path": "../data/dev.parquet", "format": "hf"}}}))
    assert cfg.data.eval_pairs.path == str(project / "data" / "dev.parquet")
    cfg = load_config(_with(project, {"data": {"eval_pairs": {"path": "data/dev.parquet", "format": "hf"}}}))
    assert cfg.data.eval_pairs.path == str(project / "configs" / "data" / "dev.parquet")


def test_a_resumed_run_reads_the_absolute_paths_it_saved(project, tmp_path, monkeypatch):
    cfg = load_config(project / "configs" / "run.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    monkeypatch.chdir(tmp_path)
    assert load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()


def _with(project: Path, changes: dict) -> Path:
    """A copy of the project's config, beside it, with `changes` merged in."""
    config = yaml.safe_load((project / "configs" / "run.yaml").read_text())
    for section, values in changes.items():
        for key, value in values.items():
            if isinstance(value, dict):
                config[section].setdefault(key, {}).update(value)
            else:
                config[section][key] = value
    path = project / "configs" / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_stage_configs_inputs_resolve_by_the_same_rule(project, monkeypatch, tmp_path):
    from apo_ray.config import RMStageConfig, load_stage_config

    stage = {
        "base_model": "../models/policy",
        "run_dir": "runs/rm",
        "train": {"path": "../data/train.jsonl"},
        "eval": {"path": "../data/train.jsonl"},
    }
    (project / "configs" / "rm.yaml").write_text(yaml.safe_dump(stage))
    monkeypatch.chdir(tmp_path)  # anywhere but the project
    cfg = load_stage_config(
        RMStageConfig, project / "configs" / "rm.yaml", [f"eval.path={project / 'data' / 'train.jsonl'}"]
    )
    assert cfg.train.path == str(project / "data" / "train.jsonl")
    assert cfg.base_model == str(project / "models" / "policy")
    assert cfg.run_dir == "runs/rm"


def test_the_shipped_stage_configs_point_at_the_data_in_the_repository():
    from apo_ray.config import RMStageConfig, SFTStageConfig, load_stage_config

    root = Path(__file__).resolve().parents[1]
    for cls, name in ((RMStageConfig, "rm_hh_minilm.yaml"), (SFTStageConfig, "sft_hh_qwen2.5_0.5b.yaml")):
        cfg = load_stage_config(cls, root / "configs" / "stages" / name)
        assert Path(cfg.train.path) == root / "data" / "hh_harmless" / "train.jsonl"
        assert Path(cfg.train.path).is_file()


def test_the_aapa_discriminator_path_is_an_input_read_from_the_config_file(project, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = project / "configs" / "run.yaml"
    cfg = load_config(config, ["aapa.enabled=true"])
    assert cfg.aapa.discriminator_path == "reward"  # the run's RM architecture, no path
    tree = yaml.safe_load(config.read_text())
    tree["aapa"] = {"enabled": True, "discriminator_path": "models/rm"}
    config.write_text(yaml.safe_dump(tree))
    assert load_config(config).aapa.discriminator_path == str(project / "configs" / "models" / "rm")
    # On the command line: read from the working directory, which has no such model.
    with pytest.raises(ConfigError, match=rf"^aapa.discriminator_path: path does not exist: {tmp_path}/models/rm"):
        load_config(config, ["aapa.discriminator_path=./models/rm"])
