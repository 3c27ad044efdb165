"""`apo-ray serve`'s OpenAI-compatible routes on a real instruct model (SmolLM2-135M-Instruct, ChatML template),
through the official `openai` client on 127.0.0.1: chat and completions, plain and streamed, the model list,
the bearer token, and one bad request per field. One app for the module, a few tokens per request."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import free_port

TOKEN = "test-token-" + "1" * 24
QUESTION = [{"role": "user", "content": "How do I make a cup of tea?"}]
PROMPT = "The capital of France is"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def served(ray_cluster, smollm2_dir):
    from ray import serve

    from apo_ray.serve.app import check_targets, deploy, load_serve_config
    from apo_ray.serve.targets import resolve_targets

    targets = resolve_targets([smollm2_dir])
    cfg = check_targets(
        targets,
        load_serve_config(
            None,
            {},
            [
                f"serve.port={free_port()}",
                "serve.policy.num_cpus=1",
                "serve.ingress.num_cpus=0.25",
                "serve.max_model_len=256",
                "serve.kv_cache_bytes=67108864",
                "serve.limits.max_prompt_tokens=64",
                "serve.limits.max_tokens=16",
                "serve.limits.max_n=2",
                "serve.limits.max_body_bytes=4096",
            ],
        ),
    )
    url = deploy(targets, cfg, TOKEN)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """The checkpoint under plain transformers: its tokenizer and its float32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoTokenizer.from_pretrained(smollm2_dir),
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(),
    )


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def hf_greedy(model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.integration
def test_chat_renders_the_policys_template_and_decodes_greedily_as_transformers(client, reference):
    tokenizer, model = reference
    answer = client.chat.completions.create(model="policy", messages=QUESTION, max_tokens=NEW_TOKENS, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == "policy"
    assert answer.created > 0 and len(answer.choices) == 1
    choice = answer.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == NEW_TOKENS
    assert answer.usage.total_tokens == len(prompt_ids) + NEW_TOKENS
    assert choice.message.content == tokenizer.decode(hf_greedy(model, prompt_ids), skip_special_tokens=True)


@pytest.mark.integration
def test_a_streamed_chat_is_the_same_answer_in_deltas(client, served):
    whole = client.chat.completions.create(model="policy", messages=QUESTION, max_tokens=NEW_TOKENS, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="policy", messages=QUESTION, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    # The wire format itself: `data: {...}` events, the last one `data: [DONE]`.
    with httpx.stream(
        "POST",
        served + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": "policy", "messages": QUESTION, "max_tokens": 2, "stream": True},
        timeout=120,
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.integration
def test_completions_plain_and_streamed(client, reference):
    tokenizer, model = reference
    whole = client.completions.create(model="policy", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.choices[0].text == tokenizer.decode(hf_greedy(model, prompt_ids), skip_special_tokens=True)
    streamed = list(
        client.completions.create(model="policy", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text

    sampled = client.completions.create(
        model="policy", prompt=PROMPT, max_tokens=4, n=2, top_p=0.9, seed=1, stop=["\n"]
    )
    assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens <= 8


@pytest.mark.integration
def test_the_model_list(client):
    assert [m.id for m in client.models.list().data] == ["policy"]
    assert client.models.retrieve("policy").id == "policy"


@pytest.mark.integration
def test_the_bearer_token_guards_the_openai_routes(served):
    import openai

    stranger = openai.OpenAI(base_url=served + "/v1", api_key="x" * 32, max_retries=0, timeout=60)
    for call in (
        lambda: stranger.chat.completions.create(model="policy", messages=QUESTION, max_tokens=1),
        lambda: stranger.completions.create(model="policy", prompt=PROMPT, max_tokens=1),
        lambda: stranger.models.list(),
        lambda: stranger.models.retrieve("policy"),
    ):
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        assert info.value.status_code == 401 and info.value.body["param"] == "authorization"
    bare = httpx.post(served + "/v1/completions", json={"model": "policy", "prompt": PROMPT, "max_tokens": 1})
    assert bare.status_code == 401 and bare.headers["WWW-Authenticate"] == "Bearer"


CHAT = {"model": "policy", "messages": QUESTION, "max_tokens": 2}
COMPLETION = {"model": "policy", "prompt": PROMPT, "max_tokens": 2}


@pytest.mark.integration
@pytest.mark.parametrize(
    "path, change, status, field",
    [
        ("chat", {"messages": None}, 422, "messages"),
        ("chat", {"messages": []}, 422, "messages"),
        ("chat", {"messages": {"role": "user", "content": "hi"}}, 422, "messages"),
        ("chat", {"messages": [{"role": "user"}]}, 422, "messages[0].content"),
        ("chat", {"messages": [{"content": "hi"}]}, 422, "messages[0].role"),
        ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
        ("chat", {"messages": [{"role": "user", "content": "tea " * 80}]}, 413, "messages"),
        ("chat", {"model": "gpt-4o"}, 404, "model"),
        ("chat", {"max_tokens": 0}, 422, "max_tokens"),
        ("chat", {"max_tokens": 17}, 413, "max_tokens"),
        ("chat", {"temperature": 2.5}, 422, "temperature"),
        ("chat", {"top_p": 0}, 422, "top_p"),
        ("chat", {"n": 3}, 422, "n"),
        ("chat", {"stream": "true"}, 422, "stream"),
        ("chat", {"stop": {"at": "."}}, 422, "stop"),
        ("chat", {"tools": []}, 400, "tools"),
        ("completions", {"prompt": None}, 422, "prompt"),
        ("completions", {"prompt": ["a", "b"]}, 422, "prompt"),
        ("completions", {"prompt": "tea " * 80}, 413, "prompt"),
        ("completions", {"echo": True}, 400, "echo"),
    ],
)
def test_each_bad_field_is_refused_in_openais_error_shape(served, path, change, status, field):
    body = {**(CHAT if path == "chat" else COMPLETION), **change}
    answer = httpx.post(
        f"{served}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error


@pytest.mark.integration
def test_the_replica_still_answers_after_the_refusals(client, served):
    broken = httpx.post(
        served + "/v1/chat/completions",
        content=b"{",
        timeout=60,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
    assert client.completions.create(model="policy", prompt=PROMPT, max_tokens=1).usage.completion_tokens == 1
