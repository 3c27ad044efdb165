"""Bad input through the real entry point (`apo_ray.train.main`): exit code 2 and a message naming the file
and line or the config key, before Ray starts or any model loads, and no trace in any run directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import ray
import yaml

import apo_ray.train
from apo_ray.train import main

GOOD = [{"prompt": f"prompt {i}", "chosen": "good answer", "rejected": "bad answer"} for i in range(20)]


def _lines(records: list[dict]) -> list[str]:
    return [json.dumps(record) for record in records]


def _write_data_files(root: Path) -> None:
    good = _lines(GOOD)
    (root / "good.jsonl").write_text("\n".join(good) + "\n")
    # The 6th line is cut off mid-object, as by a copy that ran out of disk.
    (root / "truncated.jsonl").write_text("\n".join(good[:5]) + "\n" + good[5][:25])
    wrong_type = '{"prompt": "p", "chosen": 5, "rejected": "b"}'
    (root / "wrong_type.jsonl").write_text("\n".join(good[:3] + [wrong_type]) + "\n")
    (root / "missing_field.jsonl").write_text("\n".join(good[:7] + ['{"prompt": "p", "chosen": "a"}']) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n  \n\n")
    huge = json.dumps({"prompt": "p" * 1_500_000, "chosen": "a", "rejected": "b"})
    (root / "huge_line.jsonl").write_text("\n".join(good[:2] + [huge]) + "\n")
    (root / "array_line.jsonl").write_text("\n".join(good[:2] + ["[1, 2, 3]"]) + "\n")
    (root / "bad_utf8.jsonl").write_bytes(("\n".join(good[:4]) + "\n").encode() + b'{"prompt": "\xff"}\n')
    (root / "empty_prompt.jsonl").write_text("\n".join(good[:2] + _lines([{**GOOD[0], "prompt": "  "}])) + "\n")
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "no assistant turn here"}
    (root / "hh_no_turn.jsonl").write_text(json.dumps(hh) + "\n")
    (root / "gold_no_response.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    (root / "not_yaml.yaml").write_text("method: rjs\nreward: [lr: 1\n")
    (root / "list.yaml").write_text("- method: rjs\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Data files, a stand-in model directory (config.json is all validation reads) and a base config."""
    root = tmp_path_factory.mktemp("bad_input")
    _write_data_files(root)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "not_a_model").mkdir()
    model = str(root / "model")
    base = {
        "method": "rjs",
        "rounds": 1,
        "run_dir": str(root / "unused"),
        "data": {"task": "files", "source": {"path": str(root / "good.jsonl")}},
        "model": {"policy_path": model, "reward_path": model, "eval_reward": model},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


@pytest.fixture(autouse=True)
def nothing_may_start(monkeypatch):
    """Validation must fail before `run` (which starts Ray and the models) and before any ray.init."""

    def reached(*args, **kwargs):
        raise AssertionError("validation passed: Ray and the models would start now")

    was_initialized = ray.is_initialized()
    monkeypatch.setattr(apo_ray.train, "run", reached)
    monkeypatch.setattr(ray, "init", reached)
    yield
    assert ray.is_initialized() == was_initialized


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    started = time.perf_counter()
    code = main(argv)
    # Nothing heavy runs before validation ends; generous for a loaded 2-core machine.
    assert time.perf_counter() - started < 20
    return code, capsys.readouterr().err


# (overrides, pattern the message must match); {root} is the inputs directory.
DATA_CASES = [
    (
        ["data.source.path={root}/truncated.jsonl"],
        r"truncated\.jsonl:6: line is not valid JSON \(.*\); the file may be truncated",
    ),
    (["data.source.path={root}/wrong_type.jsonl"], r"wrong_type\.jsonl:4: field 'chosen' must be a string, got int"),
    (["data.source.path={root}/missing_field.jsonl"], r"missing_field\.jsonl:8: missing field 'rejected'"),
    (["data.source.path={root}/empty.jsonl"], r"data\.source\.path: .*empty\.jsonl: file is empty"),
    (["data.source.path={root}/blank.jsonl"], r"blank\.jsonl: file is empty"),
    (["data.source.path={root}/huge_line.jsonl"], r"huge_line\.jsonl:3: line longer than 1,000,000 characters"),
    (["data.source.path={root}/array_line.jsonl"], r"array_line\.jsonl:3: line is a JSON list, expected an object"),
    (["data.source.path={root}/bad_utf8.jsonl"], r"bad_utf8\.jsonl:5: line is not valid UTF-8"),
    (["data.source.path={root}/empty_prompt.jsonl"], r"empty_prompt\.jsonl:3: field 'prompt' is empty"),
    (["data.source.path={root}/no_such.jsonl"], r"data\.source\.path: .*no_such\.jsonl: file not found"),
    (["data.source.path={root}"], r"data\.source\.path: .*: not a regular file"),
    (
        ["data.source.path={root}/hh_no_turn.jsonl", "data.source.format=hh"],
        r"hh_no_turn\.jsonl:1: rejected dialogue has no '\\n\\nAssistant:' turn",
    ),
    (["data.gold.path={root}/gold_no_response.jsonl"], r"gold_no_response\.jsonl:1: missing field 'response'"),
    (["data.source.prompt_key=question"], r"good\.jsonl:1: missing field 'question'"),
]
CONFIG_CASES = [
    (["model.policy_path=/no/such/model"], r"model\.policy_path: path does not exist: /no/such/model"),
    (
        ["model.reward_path={root}/not_a_model"],
        r"model\.reward_path: .*not_a_model is not a Hugging Face model directory \(no config\.json\)",
    ),
    (
        ["model.eval_reward={root}/good.jsonl"],
        r"model\.eval_reward: .*good\.jsonl: not a GGUF file .*; a model file must be one, else name a Hugging Face "
        r"model directory",
    ),
    (
        ["model.policy_path=models/a/b"],
        r"model\.policy_path: 'models/a/b' is neither an existing directory or GGUF file, a pkg: file, "
        r"nor a hub",
    ),
    (["method=apo_zero"], r"method: must be one of dpo, ipo, rjs, rrhf, grpo, ppo, reinforce_pp; got 'apo_zero'"),
    (["method=ppo2"], r"method: must be one of .*; got 'ppo2'"),
    (["reward.lrr=1e-4"], r"reward\.lrr: unknown key"),
    (["bogus=1"], r"bogus: unknown key"),
    (["rollout.num_workers=0"], r"rollout\.num_workers: must be >= 1, got 0"),
    (["reward.lr=-1"], r"reward\.lr: must be > 0\.0, got -1\.0"),
    (["rollout.top_p=1.5"], r"rollout\.top_p: must be <= 1\.0, got 1\.5"),
    (["learner.zero_stage=4"], r"learner\.zero_stage: must be <= 3, got 4"),
    (["seed=-1"], r"seed: must be >= 0, got -1"),
    (["data.split_fractions={pairs: 0.9, gold: 0.2}"], r"data\.split_fractions: must be >= 0 and sum to <= 1"),
    (["data.split_fractions.dev=0.1"], r"data\.split_fractions\.dev: unknown split"),
    (["rollout.max_model_len=64"], r"rollout\.max_model_len: 64 < model\.max_prompt_tokens 64 \+ model\.max_response"),
    (["method=dpo", "samples_per_prompt=1"], r"samples_per_prompt: dpo needs at least 2"),
    (
        ["rollout.backend=hf", "rollout.engine_kwargs.enforce_eager=true"],
        r"rollout\.engine_kwargs: only the vllm backend",
    ),
    (["rollout.backend=hf", "rollout.weight_sync=nccl"], r"rollout\.weight_sync: 'nccl' needs rollout\.backend 'vllm'"),
    (["model.dtype=float16"], r"model\.dtype: float16 training needs loss scaling"),
    (["learner.backend=torch", "model.dtype=bfloat16"], r"model\.dtype: bfloat16 with learner\.backend=torch"),
    (["learner.backend=torch", "learner.num_gpus=1"], r"model\.dtype: bfloat16 with learner\.backend=torch"),
    (["rollout.dtype=auto"], r"rollout\.dtype: must be one of float32, bfloat16, float16; got 'auto'"),
    (["learner.zero_stage=3", "rollout.weight_sync=nccl"], r"rollout\.weight_sync: 'nccl' does not gather ZeRO-3"),
    (["ppo.tis_cap=0.5"], r"ppo\.tis_cap: must be >= 1\.0, got 0\.5"),
    (["learner.num_ranks=0"], r"learner\.num_ranks: must be >= 1, got 0"),
    (
        ["learner.backend=torch", "learner.num_ranks=2"],
        r"learner\.num_ranks: several ranks need learner\.backend deepspeed",
    ),
    (
        ["learner.backend=torch", "learner.reward_ranks=2"],
        r"learner\.reward_ranks: several ranks need learner\.backend",
    ),
    (["learner.critic_ranks=2"], r"learner\.critic_ranks: read only by method ppo; this run \(method=rjs"),
    (
        ["method=ppo", "ppo.kl_hard_limit=true", "learner.num_ranks=2"],
        r"ppo\.kl_hard_limit: decided per minibatch, so it needs the whole minibatch on one rank",
    ),
    (["rounds=two"], r"rounds: must be an integer, got 'two'"),
    (["rounds=1.5"], r"rounds: must be an integer, got 1\.5"),
    (["apo=maybe"], r"apo: must be true or false, got 'maybe'"),
    (["reward.lr=nan"], r"reward\.lr: must be a number, got 'nan'"),
    (["rollout=3"], r"rollout: must be a mapping, got int"),
    (["rounds"], r"rounds: override must look like key\.sub=value"),
]


def _fill(items: list[str], root: Path) -> list[str]:
    return [item.replace("{root}", str(root)) for item in items]


def _case_id(case) -> str:
    return " ".join(item.replace("{root}/", "") for item in case[0])


@pytest.mark.parametrize("case", DATA_CASES + CONFIG_CASES, ids=_case_id)
def test_bad_input_of_a_new_run_exits_2_naming_it(case, inputs, tmp_path, capsys):
    overrides, pattern = case
    run_dir = tmp_path / "run"
    argv = ["--config", str(inputs / "base.yaml"), *_fill(overrides, inputs), f"run_dir={run_dir}"]
    code, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith("error: ")
    assert re.search(pattern, err), err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("config_file", "pattern"),
    [
        ("no_such.yaml", r"--config: no such file: .*no_such\.yaml"),
        ("not_yaml.yaml", r"not_yaml\.yaml: not valid YAML"),
        ("list.yaml", r"list\.yaml: top level must be a mapping"),
    ],
)
def test_bad_config_file_exits_2_naming_it(config_file, pattern, inputs, capsys):
    code, err = run_main(["--config", str(inputs / config_file)], capsys)
    assert code == 2
    assert re.search(pattern, err), err


def _tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def existing_run(inputs, tmp_path) -> Path:
    """A run directory as a run killed after round 0 leaves it."""
    run_dir = tmp_path / "existing"
    checkpoint = run_dir / "checkpoints" / "round_0000"
    checkpoint.mkdir(parents=True)
    cfg = yaml.safe_load((inputs / "base.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": str(run_dir)}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "round": 0, "rm/acc": 0.5}) + "\n")
    (checkpoint / "state.json").write_text(json.dumps({"round": 0, "policy_version": 0}))
    (run_dir / "checkpoints" / "LATEST").write_text("0")
    return run_dir


@pytest.mark.parametrize("case", DATA_CASES + CONFIG_CASES, ids=_case_id)
def test_bad_input_when_resuming_leaves_the_run_dir_untouched(case, inputs, existing_run, capsys):
    overrides, pattern = case
    before = _tree_digest(existing_run)
    code, err = run_main(["--resume", str(existing_run), *_fill(overrides, inputs)], capsys)
    assert code == 2
    assert re.search(pattern, err), err
    assert _tree_digest(existing_run) == before


def test_a_new_run_into_an_existing_run_dir_is_refused_untouched(inputs, existing_run, capsys):
    before = _tree_digest(existing_run)
    code, err = run_main(["--config", str(inputs / "base.yaml"), f"run_dir={existing_run}"], capsys)
    assert code == 2
    assert f"run_dir: {existing_run} already holds files; pass --resume {existing_run}" in err
    assert _tree_digest(existing_run) == before


def test_the_base_config_itself_is_valid(inputs, tmp_path, capsys):
    # Guards the cases above: each fails for its own bad input, not for something wrong in the base.
    with pytest.raises(AssertionError, match="validation passed"):
        main(["--config", str(inputs / "base.yaml"), f"run_dir={tmp_path / 'run'}"])


def test_a_critic_from_an_rm_with_another_tokenizer_is_refused_before_ray_starts(smollm2_dir, tmp_path, capsys):
    from tests.conftest import REPO_ROOT, minilm_tokenizer_dir

    code = main(
        [
            "--config",
            str(REPO_ROOT / "configs" / "hh_smollm2_apo_rjs_cpu.yaml"),
            "method=ppo",
            f"model.policy_path={smollm2_dir}",
            f"model.reward_path={minilm_tokenizer_dir()}",
            f"model.eval_reward={minilm_tokenizer_dir()}",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    # nothing_may_start already fails the test if Ray would start; an earlier test may have left it up
    assert code == 2 and not (tmp_path / "run").exists()
    assert "ppo.critic_init: the model at" in capsys.readouterr().err
