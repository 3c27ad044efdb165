"""`apo-ray serve` before any model: request validation, batching bookkeeping, targets, token and config checks."""

from __future__ import annotations

import json
import shutil

import pytest

from apo_ray.config import ConfigError, ServeLimitsConfig, load_config
from apo_ray.serve.app import check_targets, is_loopback, load_serve_config, serve_token
from apo_ray.serve.batching import chunks, flatten, split
from apo_ray.serve.requests import (
    RequestError,
    ScoreItem,
    check_prompt_tokens,
    parse_generate_request,
    parse_json,
    parse_score_request,
)
from apo_ray.serve.targets import resolve_targets

LIMITS = ServeLimitsConfig(
    max_body_bytes=200,
    max_score_items=3,
    max_text_chars=10,
    max_prompt_tokens=8,
    max_tokens=32,
    max_n=2,
    max_temperature=1.5,
)


def refused(call, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args, LIMITS)
    return info.value


@pytest.mark.parametrize(
    "body, status, field, words",
    [
        (b"x" * 201, 413, "body", "201 bytes; at most 200"),
        (b'{"prompt": ', 400, "body", "not valid JSON (Expecting value at line 1 column 12)"),
        (b"\xff\xfe", 400, "body", "not UTF-8"),
    ],
)
def test_bodies_that_are_not_json_or_too_large(body, status, field, words):
    error = refused(parse_json, body)
    assert (error.status, error.field) == (status, field) and words in error.message


def test_deeply_nested_json_is_a_400_not_a_crash():
    with pytest.raises(RequestError, match="nested too deeply") as info:
        parse_json(b"[" * 100_000, ServeLimitsConfig())
    assert info.value.status == 400


@pytest.mark.parametrize(
    "payload, status, field",
    [
        ({"prompt": "a", "response": "b"}, 400, "body"),  # an object, not an array
        ([], 422, "body"),
        ([{"prompt": "a", "response": "b"}] * 4, 413, "body"),
        ([{"prompt": "a", "response": "b"}, "text"], 422, "[1]"),
        ([{"prompt": "a"}], 422, "[0].response"),
        ([{"prompt": 3, "response": "b"}], 422, "[0].prompt"),
        ([{"prompt": "a", "response": "b" * 11}], 413, "[0].response"),
        ([{"prompt": "a", "response": "b", "reward": 1}], 400, "[0].reward"),
        ([{"prompt": " ", "response": "\n"}], 422, "[0]"),
    ],
)
def test_score_requests_are_refused_naming_the_field(payload, status, field):
    error = refused(parse_score_request, payload)
    assert (error.status, error.field) == (status, field), error
    assert error.to_json()["error"]["message"].startswith(f"{field}: ")


def test_a_good_score_request():
    items = parse_score_request([{"prompt": "Q", "response": " A"}, {"response": "B", "prompt": ""}], LIMITS)
    assert items == [ScoreItem("Q", " A"), ScoreItem("", "B")]


@pytest.mark.parametrize(
    "payload, status, field",
    [
        (["hi"], 400, "body"),
        ({"max_tokens": 4}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"prompt": "x" * 11}, 413, "prompt"),
        ({"prompt": "hi", "max_tokens": 33}, 413, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 4.0}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": True}, 422, "max_tokens"),
        ({"prompt": "hi", "temperature": 1.6}, 422, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, 422, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
        ({"prompt": "hi", "top_p": 1.01}, 422, "top_p"),
        ({"prompt": "hi", "n": 3}, 422, "n"),
        ({"prompt": "hi", "seed": -1}, 422, "seed"),
        ({"prompt": "hi", "stream": True}, 400, "stream"),
        ({"prompt": "hi", "temperature": 0, "n": 2}, 422, "n"),
    ],
)
def test_generate_requests_are_refused_naming_the_field(payload, status, field):
    error = refused(parse_generate_request, payload)
    assert (error.status, error.field) == (status, field), error


def test_generate_defaults_and_bounds():
    params = parse_generate_request({"prompt": "hi"}, LIMITS)
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.seed) == (16, 1.0, 1.0, 1, None)
    params = parse_generate_request(
        {"prompt": "hi", "max_tokens": 32, "temperature": 1.5, "top_p": 0.5, "n": 2, "seed": 7}, LIMITS
    )
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.seed) == (32, 1.5, 0.5, 2, 7)
    assert parse_generate_request({"prompt": "hi", "temperature": 0}, LIMITS).temperature == 0.0
    # A default never exceeds the configured cap.
    assert parse_generate_request({"prompt": "hi"}, ServeLimitsConfig(max_tokens=4)).max_tokens == 4
    check_prompt_tokens(8, LIMITS)
    assert refused(check_prompt_tokens, 9).status == 413
    assert refused(check_prompt_tokens, 0).field == "prompt"


def test_batching_splits_scores_back_to_their_requests():
    requests = [["a", "b"], ["c"], ["d", "e", "f"]]
    items, sizes = flatten(requests)
    assert items == list("abcdef") and sizes == [2, 1, 3]
    assert split([s.upper() for s in items], sizes) == [["A", "B"], ["C"], ["D", "E", "F"]]
    with pytest.raises(ValueError, match="5 values for 6 items"):
        split(items[:5], sizes)
    assert chunks(5, 2) == [range(2), range(2, 4), range(4, 5)] and chunks(0, 2) == []


def test_a_token_is_required_off_loopback():
    cfg = load_serve_config(None, {}, ["serve.host=0.0.0.0"])
    with pytest.raises(ConfigError, match=r"serve.host: 0.0.0.0 is reachable .* \$APO_RAY_SERVE_TOKEN"):
        serve_token(cfg, {})
    with pytest.raises(ConfigError, match="APO_RAY_SERVE_TOKEN: the token has 5 characters"):
        serve_token(cfg, {"APO_RAY_SERVE_TOKEN": "short"})
    assert serve_token(cfg, {"APO_RAY_SERVE_TOKEN": "t" * 32}) == "t" * 32
    assert serve_token(load_serve_config(None, {}, []), {}) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_serve_config_from_a_run_a_file_and_overrides(tmp_path):
    run_section = load_config(None, ["serve.reward.replicas=3"]).to_dict()["serve"]
    cfg = load_serve_config(None, run_section, ["serve.port=8123"])
    assert (cfg.reward.replicas, cfg.port) == (3, 8123)
    file = tmp_path / "serve.yaml"
    file.write_text("serve:\n  score_max_batch_size: 4\n")
    assert load_serve_config(str(file), run_section, []).reward.replicas == 1
    with pytest.raises(ConfigError, match="serve.max_model_len: 64 < serve.limits.max_prompt_tokens 256"):
        load_serve_config(None, {}, ["serve.max_model_len=64"])
    with pytest.raises(ConfigError, match="serve.limits.max_n: must be >= 1"):
        load_serve_config(None, {}, ["serve.limits.max_n=0"])
    with pytest.raises(ConfigError, match="port: not a serve setting"):
        load_serve_config(None, {}, ["port=1"])


def write_model(directory, architecture: str, **config):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"architectures": [architecture], **config}))
    return directory


def test_the_policy_context_bounds_the_limits(tmp_path):
    targets = resolve_targets([str(write_model(tmp_path / "policy", "LlamaForCausalLM", max_position_embeddings=128))])
    assert (
        check_targets(
            targets, load_serve_config(None, {}, ["serve.limits.max_prompt_tokens=96", "serve.limits.max_tokens=32"])
        ).max_model_len
        == 128
    )
    with pytest.raises(ConfigError, match="serve.max_model_len: 512 is more than the policy's max_position_embeddings"):
        check_targets(targets, load_serve_config(None, {}, ["serve.max_model_len=512"]))
    with pytest.raises(ConfigError, match="serve.limits.max_prompt_tokens: 256 .* context of 128 tokens"):
        check_targets(targets, load_serve_config(None, {}, []))
    long_context = resolve_targets(
        [str(write_model(tmp_path / "long", "Qwen2ForCausalLM", max_position_embeddings=32768))]
    )
    assert check_targets(long_context, load_serve_config(None, {}, [])).max_model_len == 2048


def test_targets_from_game_runs_stage_runs_and_model_dirs(tmp_path):
    game = tmp_path / "game"
    write_model(game / "checkpoints" / "round_0002" / "policy", "LlamaForCausalLM")
    write_model(game / "checkpoints" / "round_0002" / "reward", "BertForSequenceClassification")
    (game / "checkpoints" / "LATEST").write_text("2")
    (game / "config.yaml").write_text("reward:\n  max_length: 96\nserve:\n  port: 8100\n")
    found = resolve_targets([str(game)])
    assert found.policy.name == "policy" and found.reward.parent.name == "round_0002"
    assert found.reward_max_length == 96 and found.serve_section == {"port": 8100}

    rm_run = tmp_path / "rm"
    write_model(rm_run / "model", "BertForSequenceClassification")
    (rm_run / "config.yaml").write_text("stage: rm\nmax_length: 200\n")
    sft_model = write_model(tmp_path / "sft" / "model", "Qwen2ForCausalLM")
    found = resolve_targets([str(sft_model), str(rm_run)])
    assert found.policy == sft_model.resolve() and found.reward == (rm_run / "model").resolve()
    assert found.reward_max_length == 200

    with pytest.raises(ConfigError, match="a second policy"):
        resolve_targets([str(game), str(sft_model)])
    # A LoRA run's round checkpoint: the merged model with checkpoint.merge_lora, else a clear refusal.
    lora = tmp_path / "lora" / "round_0001"
    write_model(lora / "policy" / "merged", "LlamaForCausalLM")
    (lora / "policy" / "adapter_config.json").write_text("{}")
    assert resolve_targets([str(lora)]).policy == (lora / "policy" / "merged").resolve()
    shutil.rmtree(lora / "policy" / "merged")
    with pytest.raises(ConfigError, match=r"policy: a LoRA adapter without its merged model; .*checkpoint\.merge_lora"):
        resolve_targets([str(lora)])
    with pytest.raises(ConfigError, match="neither a causal LM"):
        resolve_targets([str(write_model(tmp_path / "odd", "BertModel"))])
    with pytest.raises(ConfigError, match="not a run directory, a round checkpoint"):
        resolve_targets([str(tmp_path)])
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_targets([str(tmp_path / "missing")])
