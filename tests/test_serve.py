"""`apo-ray serve` on a local Ray cluster, through real HTTP on 127.0.0.1: the RM behind @serve.batch, the policy on
ray.serve.llm's vLLM server (CPU), a bearer token, and bad requests that get a 4xx naming the field while the
replicas keep serving. Tiny builtin-vocabulary models made here."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests
import torch

from tests.conftest import free_port

TOKEN = "test-token-" + "0" * 24
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["topic : river ; about : night ; answer :", "topic : market ; about : sound ; answer :"]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from apo_ray.builtin.models import make_policy_model, make_reward_model, make_tokenizer
    from apo_ray.serve.app import check_targets, deploy, load_serve_config
    from apo_ray.serve.targets import resolve_targets

    checkpoint = tmp_path_factory.mktemp("serve") / "round"
    tokenizer = make_tokenizer()
    make_policy_model(checkpoint / "policy", tokenizer, seed=1)
    make_reward_model(checkpoint / "reward", tokenizer, seed=2)
    targets = resolve_targets([str(checkpoint)])
    cfg = check_targets(
        targets,
        load_serve_config(
            None,
            {},
            [
                f"serve.port={free_port()}",
                "serve.policy.num_cpus=1",
                "serve.reward.num_cpus=0.5",
                "serve.ingress.num_cpus=0.25",
                "serve.max_model_len=64",
                "serve.kv_cache_bytes=67108864",
                "serve.limits.max_prompt_tokens=24",
                "serve.limits.max_tokens=16",
                "serve.limits.max_score_items=8",
                "serve.limits.max_body_bytes=4096",
                "serve.score_max_batch_size=8",
                "serve.score_batch_wait_s=0.05",
            ],
        ),
    )
    url = deploy(targets, cfg, TOKEN)
    yield url, targets
    serve.shutdown()


def post(url: str, path: str, payload=None, data=None, headers=HEADERS) -> requests.Response:
    return requests.post(url + path, json=payload, data=data, headers=headers, timeout=120)


@pytest.mark.integration
def test_scores_match_the_rm_and_batching_keeps_each_request_its_own(served):
    from ray import serve

    from apo_ray.modeling import encode_for_reward, load_reward_model, load_tokenizer
    from apo_ray.serve.app import APP_NAME

    url, targets = served
    requests_ = [
        [{"prompt": PROMPTS[i % 2], "response": f"the river is calm {'and bright ' * (i % 3)}"} for i in range(size)]
        for size in (1, 3, 2, 5, 1, 4, 2, 3, 1, 2, 6, 1)
    ]
    alone = [post(url, "/score", items).json() for items in requests_]
    with concurrent.futures.ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(lambda items: post(url, "/score", items), requests_))
    assert all(r.status_code == 200 for r in together)
    for single, batched, items in zip(alone, together, requests_):
        assert len(single["scores"]) == len(items) and single["truncated"] == [False] * len(items)
        assert batched.json()["scores"] == pytest.approx(single["scores"], abs=1e-5)
    stats = serve.get_deployment_handle("reward", APP_NAME).batch_stats.remote().result()
    assert max(stats) > 1, f"no batch held more than one request: {stats}"

    tokenizer, model = load_tokenizer(str(targets.reward)), load_reward_model(str(targets.reward), "float32").eval()
    items = requests_[10]
    batch = encode_for_reward(tokenizer, [i["prompt"] for i in items], [i["response"] for i in items], 256)
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    assert alone[10]["scores"] == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.integration
def test_generate_samples_from_the_policy_within_the_bounds(served):
    from transformers import AutoModelForCausalLM

    from apo_ray.modeling import load_tokenizer

    url, targets = served
    greedy = [post(url, "/generate", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}) for _ in range(2)]
    assert [g.status_code for g in greedy] == [200, 200]
    first = greedy[0].json()
    assert first == greedy[1].json() and len(first["choices"]) == 1
    choice = first["choices"][0]
    assert 1 <= len(choice["token_ids"]) <= 8 and choice["finish_reason"] in ("stop", "length")
    # Greedy under the policy itself: every sampled token is the argmax of its logits there.
    tokenizer = load_tokenizer(str(targets.policy))
    model = AutoModelForCausalLM.from_pretrained(targets.policy, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert first["prompt_tokens"] == len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + choice["token_ids"]])).logits[0, len(prompt_ids) - 1 : -1]
    picked = logits.gather(1, torch.tensor(choice["token_ids"])[:, None])[:, 0]
    assert torch.all(picked >= logits.max(dim=1).values - 1e-4)
    assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)

    sampled = post(url, "/generate", {"prompt": PROMPTS[1], "max_tokens": 16, "n": 2, "top_p": 0.9, "seed": 3})
    assert sampled.status_code == 200 and len(sampled.json()["choices"]) == 2
    assert all(len(c["token_ids"]) <= 16 for c in sampled.json()["choices"])


@pytest.mark.integration
def test_bad_requests_get_a_4xx_naming_the_field_and_the_replicas_keep_serving(served):
    url, _ = served
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok", "score": True, "generate": True}
    assert post(url, "/score", [{"prompt": "a", "response": "b"}], headers={}).status_code == 401
    wrong = post(url, "/score", [{"prompt": "a", "response": "b"}], headers={"Authorization": "Bearer " + "x" * 32})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    cases = [
        ("/score", None, b"[{", 400, "body"),
        ("/score", {"prompt": "a"}, None, 400, "body"),
        ("/score", [{"prompt": "a", "response": 7}], None, 422, "[0].response"),
        ("/score", [{"prompt": "a", "response": "b"}] * 9, None, 413, "body"),
        ("/score", None, b"[" + b" " * 5000 + b"]", 413, "body"),
        ("/generate", {"prompt": "river " * 40}, None, 413, "prompt"),
        ("/generate", {"prompt": "hi", "max_tokens": 17}, None, 413, "max_tokens"),
        ("/generate", {"prompt": "hi", "temperature": "warm"}, None, 422, "temperature"),
        ("/generate", {"prompt": "hi", "n": 0}, None, 422, "n"),
        ("/generate", {"prompt": "hi", "logprobs": 5}, None, 400, "logprobs"),
        ("/generate", [PROMPTS[0]], None, 400, "body"),
    ]
    for path, payload, data, status, field in cases:
        answer = post(url, path, payload, data=data)
        assert answer.status_code == status, (path, payload, answer.text)
        assert answer.json()["error"]["field"] == field, answer.text
    assert post(url, "/score", [{"prompt": PROMPTS[0], "response": "calm"}]).status_code == 200
    assert post(url, "/generate", {"prompt": PROMPTS[0], "max_tokens": 2}).status_code == 200


@pytest.mark.integration
def test_a_policy_without_a_chat_template_refuses_chat_and_still_completes(served):
    url, _ = served
    chat = post(url, "/v1/chat/completions", {"model": "policy", "messages": [{"role": "user", "content": "river"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
    assert "no chat template" in chat.json()["error"]["message"]
    completion = post(url, "/v1/completions", {"model": "policy", "prompt": PROMPTS[0], "max_tokens": 2})
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] <= 2
