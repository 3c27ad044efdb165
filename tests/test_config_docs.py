"""Every config key is documented where it is defined, and docs/config.md is generated from those descriptions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

import apo_ray.config as config
from apo_ray.config_docs import COMMAND, document, find_section, sections

ROOT = Path(__file__).resolve().parents[1]
MODELS = [cls for cls in vars(config).values()
          if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == config.__name__]


def test_every_config_field_has_a_description():
    missing = [f"{cls.__name__}.{name}" for cls in MODELS for name, field in cls.model_fields.items()
               if not (field.description or "").strip()]
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
