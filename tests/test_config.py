"""Config loading: YAML + overrides, and every kind of bad value failing with its dotted key."""

from pathlib import Path

import pytest

from apo_ray.config import ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/default.yaml", ["method=dpo", "reward.lr=1e-4", "rollout.num_workers=2", "apo=false"])
    assert (cfg.method, cfg.reward.lr, cfg.rollout.num_workers, cfg.apo) == ("dpo", 1e-4, 2, False)
    assert isinstance(cfg.reward.lr, float)


def test_dtype_resolves_once_for_learners_and_rollout_engines():
    cpu = load_config(None, [])
    assert (cpu.learner_dtype, cpu.rollout_dtype) == ("float32", "float32")
    gpu = load_config(None, ["learner.num_gpus=1", "rollout.num_gpus_per_worker=1"])
    assert (gpu.learner_dtype, gpu.rollout_dtype) == ("bfloat16", "bfloat16")
    # Sampling in another precision than the learners train in is a choice the user states.
    mixed = load_config(None, ["rollout.dtype=bfloat16"])
    assert (mixed.learner_dtype, mixed.rollout_dtype) == ("float32", "bfloat16")
    assert load_config(None, ["model.dtype=bfloat16"]).rollout_dtype == "bfloat16"


def test_apo_coef_defaults_to_authors_value_and_can_be_set():
    assert load_config(None, ["samples_per_prompt=4"]).apo_coef == pytest.approx(0.025)
    assert load_config(None, ["reward.apo_coef=0.3"]).apo_coef == 0.3


@pytest.mark.parametrize(
    "override, key",
    [
        ("methd=dpo", "methd: unknown key"),
        ("reward.lrr=1", "reward.lrr: unknown key"),
        ("method=sft", "method: must be one of"),
        ("reward.lr=-1", "reward.lr: must be > 0"),
        ("reward.lr=0", "reward.lr: must be > 0"),
        ("rounds=0", "rounds: must be >= 1"),
        ("rounds=2.5", "rounds: must be an integer"),
        ("apo=maybe", "apo: must be true or false"),
        ("learner.zero_stage=4", "learner.zero_stage: must be <= 3"),
        ("rollout.top_p=1.5", "rollout.top_p: must be <= 1.0"),
        ("reward.loss=hinge", "reward.loss: must be one of bt, diff"),
        ("reward=3", "reward: must be a mapping"),
        ("reward.lr=.nan", "reward.lr: must be finite"),
        ("reward.lr=fast", "reward.lr: must be a number"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="samples_per_prompt: dpo needs at least 2"):
        load_config(None, ["method=dpo", "samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="data.split_fractions"):
        load_config(None, ["data.split_fractions.pairs=0.9", "data.split_fractions.gold=0.5"])
    with pytest.raises(ConfigError, match="model.policy_path: path does not exist"):
        load_config(None, ["data.task=files", "data.source.path=x.jsonl", "model.eval_reward=/nope", "model.policy_path=/no/such/model"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(tmp_path / "missing.yaml")


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true", "e=1e-3"]) == {"a": {"b": 1, "c": "x"}, "d": True, "e": 1e-3}
    with pytest.raises(ConfigError, match="override must look like key.sub=value"):
        parse_overrides(["method"])
