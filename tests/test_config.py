"""Config loading: YAML + overrides, and every kind of bad value failing with its dotted key."""

from pathlib import Path

import pytest

from apo_ray.config import ConfigError, config_from_dict, keys_the_run_ignores, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(
        ROOT / "configs/default.yaml", ["method=dpo", "reward.lr=1e-4", "rollout.num_workers=2", "apo=false"]
    )
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


def test_policy_lr_left_out_is_the_methods_and_given_is_kept():
    from apo_ray.config import PolicyConfig
    from apo_ray.methods import methods

    assert {m.name: load_config(None, [f"method={m.name}"]).policy.lr for m in methods()} == {
        "rjs": 1e-3,
        "rrhf": 1e-5,
        "dpo": 1e-4,
        "ipo": 1e-4,
        "ppo": 3e-4,
        "grpo": 3e-4,
        "reinforce_pp": 3e-4,
    }
    assert load_config(None, ["method=dpo"]).policy.lr == 1e-4 != load_config(None, ["method=rjs"]).policy.lr
    assert load_config(None, ["method=dpo", "policy.lr=0.001"]).policy.lr == 0.001
    # The saved config names it, so a resumed or re-read run keeps the lr it ran with.
    assert config_from_dict(load_config(None, ["method=dpo"]).to_dict()).policy.lr == 1e-4
    assert PolicyConfig().lr == 1e-3  # a learner built without a run's Config


def test_apo_coef_defaults_to_the_tuned_value_and_null_means_the_authors():
    assert load_config(None, ["samples_per_prompt=4"]).apo_coef == 1.0
    assert load_config(None, ["samples_per_prompt=4", "reward.apo_coef=null"]).apo_coef == pytest.approx(0.025)
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
        load_config(
            None,
            [
                "data.task=files",
                "data.source.path=x.jsonl",
                "model.eval_reward=/nope",
                "model.policy_path=/no/such/model",
            ],
        )


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=rjs", "ppo.kl_coef=0.1"], "ppo.kl_coef: read only by the online methods"),
        (["method=dpo", "ppo.clip_eps=0.1"], "ppo.clip_eps: read only by the online methods"),
        (["method=ppo", "policy.dpo_beta=0.2"], "policy.dpo_beta: read only by method dpo"),
        (["method=ppo", "policy.epochs_per_round=3"], "policy.epochs_per_round: read only by the offline methods"),
        (["method=rjs", "policy.rrhf_sft_coef=0.5"], "policy.rrhf_sft_coef: read only by method rrhf"),
        (["method=grpo", "ppo.lam=0.9"], "ppo.lam: read only by method ppo"),
        (["method=grpo", "ppo.gamma=0.9"], "ppo.gamma: read only by methods ppo and reinforce_pp"),
    ],
)
def test_a_key_the_run_ignores_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        load_config(None, overrides)


def test_a_key_a_switch_turns_off_is_named_in_a_warning_and_not_saved(caplog):
    # One file serves an arm and its baseline: apo=false on an APO config is the fixed-RM run.
    with caplog.at_level("WARNING", logger="apo_ray.config"):
        cfg = load_config(None, ["apo=false", "reward.update_every=2", "method=ppo", "ppo.kl_horizon=5"])
    assert (
        "does not read reward.update_every, ppo.kl_horizon" in caplog.text
        or "does not read ppo.kl_horizon, reward.update_every" in caplog.text
    ), caplog.text
    assert "update_every" not in cfg.to_dict()["reward"] and "kl_horizon" not in cfg.to_dict()["ppo"]


def test_method_on_the_command_line_switches_off_the_files_keys_for_another_method(tmp_path, caplog):
    # One recipe serves every method: its offline keys warn under method=grpo; a wrong key typed beside it does not.
    config = tmp_path / "recipe.yaml"
    config.write_text("method: rjs\npolicy:\n  batch_size: 16\n  epochs_per_round: 1\n")
    with caplog.at_level("WARNING", logger="apo_ray.config"):
        cfg = load_config(config, ["method=grpo"])
    assert "does not read policy.batch_size, policy.epochs_per_round" in caplog.text
    assert "batch_size" not in cfg.to_dict()["policy"]
    with pytest.raises(ConfigError, match=r"^policy\.dpo_beta: read only by method dpo"):
        load_config(config, ["method=grpo", "policy.dpo_beta=0.2"])
    # The file's own method: its keys are read, and a key for another method is still refused.
    config.write_text("method: grpo\npolicy:\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"^policy\.batch_size: read only by the offline methods"):
        load_config(config, ["method=grpo"])


def test_keys_the_run_reads_are_accepted_and_the_saved_config_loads_back():
    for overrides in (
        ["method=dpo", "policy.dpo_beta=0.2"],
        ["method=ppo", "ppo.adaptive_kl=true", "ppo.kl_horizon=5"],
        ["method=grpo", "ppo.kl_coef=0.01"],
        ["apo=false", "reward.pref_coef=2.0"],
    ):
        cfg = load_config(None, overrides)
        # config.yaml holds just what the run reads, so resuming from it passes the same check.
        saved = cfg.to_dict()
        for key in keys_the_run_ignores(cfg):
            *sections, leaf = key.split(".")
            node = saved
            for section in sections:
                node = node[section]
            assert leaf not in node, key
        assert config_from_dict(saved) == cfg
    ppo_ignores = keys_the_run_ignores(load_config(None, ["method=ppo"]))
    assert {"policy.dpo_beta", "policy.batch_size", "ppo.kl_horizon"} <= set(ppo_ignores)
    assert not {"ppo.clip_eps", "ppo.lam", "policy.lr", "reward.update_every"} & set(ppo_ignores)


def test_errors_list_allowed_values_and_suggest_close_keys():
    with pytest.raises(
        ConfigError, match=r"^method: must be one of dpo, ipo, rjs, rrhf, grpo, ppo, reinforce_pp; got 'sft'$"
    ):
        load_config(None, ["method=sft"])
    with pytest.raises(ConfigError, match=r"^reward\.epochs: unknown key \(did you mean epochs_per_round\?\)$"):
        load_config(None, ["reward.epochs=2"])
    with pytest.raises(ConfigError, match=r"^ppo\.iterations: renamed to rounds"):
        load_config(None, ["method=ppo", "ppo.iterations=5"])
    with pytest.raises(ConfigError, match=r"^rollout\.num_workers: must be an integer, got '2'$"):
        load_config(None, ["rollout.num_workers='2'"])
