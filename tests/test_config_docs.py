"""Every config key is documented where it is defined, docs/config.md is generated from those descriptions, and
`--help-config` prints them without starting anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

import apo_ray.config as config
from apo_ray.config_docs import COMMAND, document, find_section, sections
from apo_ray.stages.cli import main as stage_main
from apo_ray.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MODELS = [
    cls
    for cls in vars(config).values()
    if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == config.__name__
]


def test_every_config_field_has_a_description():
    missing = [
        f"{cls.__name__}.{name}"
        for cls in MODELS
        for name, field in cls.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert len(MODELS) > 20
    assert not missing, f"fields without a description: {missing}"


@pytest.mark.parametrize("command", ["train", "sft", "rm"])
def test_every_section_has_an_intro_and_every_key_a_type(command):
    for section in sections(command):
        assert section.intro, f"{section.name}: its class has no docstring"
        assert all(key.type and key.description for key in section.keys), section.name


def test_docs_config_md_is_generated_from_the_fields():
    assert (ROOT / "docs" / "config.md").read_text() == document(), f"docs/config.md is stale: run `{COMMAND}`"


def test_a_shared_section_is_documented_once_with_its_places():
    data_source = find_section("train", "data.pairs")
    assert data_source.name == "data_source"
    assert {"data.source", "data.pairs", "train", "eval"} <= set(data_source.mounts)
    assert "<data_source>.skip" in [key.key for key in data_source.keys]
    assert document().count("### data_source") == 1
    # A factory that sets a default of its own shows it on the field that holds the section.
    ingress = next(key for key in find_section("train", "serve").keys if key.key == "serve.ingress")
    assert ingress.default == '{"num_cpus": 0.5}'


def test_help_config_prints_a_sections_keys_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help-config", "reward"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert 'reward.apo_normalization  (one of per_term, pooled; default "per_term")' in out
    assert "apo_coef weighs the whole gold-vs-sample term" in out
    assert "ppo.kl_coef" not in out


def test_help_config_without_a_section_prints_every_section(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help-config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f"\n{name}\n" in f"\n{out}" for name in ("top", "ppo", "serve.limits", "apl.attacker"))


def test_help_config_refuses_an_unknown_section_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help-config", "rewards"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section 'rewards'" in err and "reward, policy, ppo" in err


def test_the_stages_print_their_own_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        stage_main("rm", ["--help-config", "rm"])
    assert exc.value.code == 0
    assert "pooling  (one of native, mean" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        stage_main("sft", ["--help-config", "reward"])
    assert exc.value.code == 2
    assert "the sections are: stage, sft, data_source, workers, ray" in capsys.readouterr().err


def test_help_config_starts_no_ray():
    script = (
        "import sys\nfrom apo_ray.cli import main\ntry:\n    main(['train', '--help-config', 'ppo'])\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "ppo.kl_hard_limit_at" in out
    assert out.rstrip().endswith("no ray")
