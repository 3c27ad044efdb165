"""The Ray Serve application of `apo-ray serve`: an HTTP ingress in front of two deployments.

- `RewardScorer`: the RM on replicas of its own. Concurrent /score requests are scored together
  (`@serve.batch`: up to `serve.score_max_batch_size` requests per batch), in forward passes of at most
  FORWARD_ROWS sequences, off the replica's event loop so the next batch gathers meanwhile.
- the policy: ray.serve.llm's LLMServer (vLLM; on CPU through its CPU accelerator config). The ingress sends it
  token ids encoded by the policy's own tokenizer (as the game's rollout workers do) and decodes the sampled ids
  with it, so /generate returns what the game's samplers would.
- `Ingress` (FastAPI): authentication, size limits and request validation (apo_ray.serve.requests), so only
  well-formed work reaches the model replicas; every refusal is a 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
from pathlib import Path
from typing import Any, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from apo_ray.config import ServeConfig, ServeLimitsConfig, resolve_dtype
from apo_ray.serve.batching import chunks, flatten, split
from apo_ray.serve.requests import (RequestError, ScoreItem, check_prompt_tokens, parse_generate_request, parse_json,
                                    parse_score_request)
from apo_ray.serve.targets import ServeTargets

POLICY_MODEL_ID = "policy"
FORWARD_ROWS = 64
DEFAULT_REWARD_MAX_LENGTH = 256

app = FastAPI(title="apo-ray", openapi_url=None, docs_url=None, redoc_url=None)


class RewardScorer:
    def __init__(self, model_dir: str, max_length: int, dtype: str):
        from apo_ray.modeling import load_reward_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_reward_model(model_dir, dtype).eval()
        self.max_length = max_length
        # Requests per batch -> how many batches had that many: what @serve.batch achieved under the load.
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config: batch settings change without restarting the replica."""
        self.score_batch.set_max_batch_size(user_config["max_batch_size"])
        self.score_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[list[ScoreItem]]) -> list[dict[str, list]]:
        self.batch_sizes[len(requests)] += 1
        items, sizes = flatten(requests)
        scores, truncated = await asyncio.to_thread(self._score, items)
        return [{"scores": s, "truncated": t} for s, t in zip(split(scores, sizes), split(truncated, sizes))]

    async def score(self, items: list[ScoreItem]) -> dict[str, list]:
        return await self.score_batch(items)

    @torch.no_grad()
    def _score(self, items: list[ScoreItem]) -> tuple[list[float], list[bool]]:
        from apo_ray.modeling import encode_for_reward

        prompts, responses = [i.prompt for i in items], [i.response for i in items]
        lengths = [len(ids) for ids in self.tokenizer([p + r for p, r in zip(prompts, responses)])["input_ids"]]
        scores: list[float] = []
        for rows in chunks(len(items), FORWARD_ROWS):
            batch = encode_for_reward(self.tokenizer, prompts[rows.start:rows.stop], responses[rows.start:rows.stop],
                                      self.max_length).to(self.model.device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scores += logits.squeeze(-1).float().tolist()
        return scores, [n > self.max_length for n in lengths]

    def batch_stats(self) -> dict[int, int]:
        return dict(self.batch_sizes)


async def read_body(request: Request, limits: ServeLimitsConfig) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (a declared length is checked first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(413, "body", f"{declared} bytes; at most {limits.max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise RequestError(413, "body", f"more than {limits.max_body_bytes} bytes")
    return bytes(body)


def token_digest(token: Optional[str]) -> Optional[str]:
    # The replicas keep a digest, not the token: deployment arguments live in Ray's control plane.
    return hashlib.sha256(token.encode()).hexdigest() if token else None


@serve.ingress(app)
class Ingress:
    def __init__(self, scorer: Any, policy: Any, *, policy_dir: Optional[str], limits: ServeLimitsConfig,
                 token_sha256: Optional[str]):
        self.scorer, self.policy = scorer, policy
        self.limits, self.token_sha256 = limits, token_sha256
        if policy_dir is not None:
            from apo_ray.modeling import eos_token_ids
            from apo_ray.modeling import load_tokenizer

            self.tokenizer = load_tokenizer(policy_dir)
            self.eos_ids = sorted(eos_token_ids(policy_dir, self.tokenizer))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "score": self.scorer is not None, "generate": self.policy is not None}

    @app.post("/score")
    async def score(self, request: Request) -> JSONResponse:
        return await self._answer(request, self.scorer, "score", self._score)

    @app.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        return await self._answer(request, self.policy, "generate", self._generate)

    async def _answer(self, request: Request, deployment: Any, name: str, handler) -> JSONResponse:
        try:
            self._authorize(request)
            if deployment is None:
                raise RequestError(404, name, f"this deployment serves no {'RM' if name == 'score' else 'policy'}")
            payload = parse_json(await read_body(request, self.limits), self.limits)
            return JSONResponse(await handler(payload))
        except RequestError as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return JSONResponse(error.to_json(), status_code=error.status, headers=headers)

    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()) or "", self.token_sha256):
            raise RequestError(401, "authorization", "missing or wrong bearer token")

    async def _score(self, payload: Any) -> dict[str, list]:
        items = parse_score_request(payload, self.limits)
        return await self.scorer.score.remote(items)

    async def _generate(self, payload: Any) -> dict[str, Any]:
        from ray.serve.llm.openai_api_models import CompletionRequest

        params = parse_generate_request(payload, self.limits)
        prompt_ids = self.tokenizer(params.prompt, add_special_tokens=False)["input_ids"]
        check_prompt_tokens(len(prompt_ids), self.limits)
        request = CompletionRequest(
            model=POLICY_MODEL_ID, prompt=prompt_ids, max_tokens=params.max_tokens, temperature=params.temperature,
            top_p=params.top_p, n=params.n, seed=params.seed, stop_token_ids=self.eos_ids, return_token_ids=True,
        )
        stream = self.policy.options(stream=True).completions.remote(request, None)
        response = await stream.__anext__()
        if not hasattr(response, "choices"):
            # An ErrorResponse from vLLM: the checks above keep client mistakes from reaching it.
            error = getattr(response, "error", None)
            raise RequestError(502, "policy", getattr(error, "message", str(response)))
        return {
            "prompt_tokens": len(prompt_ids),
            "choices": [{"text": self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                         "token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
                        for c in response.choices],
        }


def policy_llm_config(policy_dir: Path, cfg: ServeConfig):
    """ray.serve.llm's config of the policy's vLLM engine, on the resources of serve.policy."""
    from ray.serve.llm import LLMConfig

    on_gpu = cfg.policy.num_gpus > 0
    engine = {"dtype": resolve_dtype(cfg.dtype, on_gpu), "max_model_len": cfg.max_model_len}
    if not on_gpu:
        # As the rollout workers: no torch.compile (tens of seconds of start-up on CPU), a bounded KV cache.
        engine.update(enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_bytes)
    engine.update(cfg.engine_kwargs)
    bundle = {"CPU": cfg.policy.num_cpus, **({"GPU": cfg.policy.num_gpus} if on_gpu else {})}
    return LLMConfig(
        model_loading_config={"model_id": POLICY_MODEL_ID, "model_source": str(policy_dir)},
        accelerator_config={"kind": "gpu" if on_gpu else "cpu"},
        placement_group_config={"bundles": [bundle]},
        engine_kwargs=engine,
        # LLMServer adds its replica actor's CPUs to the engine's bundle; the actor mostly awaits the engine, so
        # serve.policy.num_cpus is the replica's whole share.
        deployment_config={"num_replicas": cfg.policy.replicas, "ray_actor_options": {"num_cpus": 0}},
        # The game's actors keep vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set for a whole cluster by the
        # tests' runtime env); LLMServer runs vLLM's async engine in its default mode, engine core in a process.
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}},
    )


def build_app(targets: ServeTargets, cfg: ServeConfig, token: Optional[str]):
    """The application: Ingress bound to a RewardScorer and a policy LLMServer for the models found."""
    from ray.serve.llm import build_llm_deployment

    scorer = policy = None
    if targets.reward is not None:
        max_length = cfg.reward_max_length or targets.reward_max_length or DEFAULT_REWARD_MAX_LENGTH
        scorer = serve.deployment(RewardScorer).options(
            name="reward", num_replicas=cfg.reward.replicas,
            ray_actor_options={"num_cpus": cfg.reward.num_cpus, "num_gpus": cfg.reward.num_gpus},
            # Room for a full batch in flight while the next one gathers.
            max_ongoing_requests=2 * cfg.score_max_batch_size,
            user_config={"max_batch_size": cfg.score_max_batch_size, "batch_wait_timeout_s": cfg.score_batch_wait_s},
        ).bind(str(targets.reward), max_length, resolve_dtype(cfg.dtype, cfg.reward.num_gpus > 0))
    if targets.policy is not None:
        policy = build_llm_deployment(policy_llm_config(targets.policy, cfg), name_prefix="apo-ray-")
    return serve.deployment(Ingress).options(
        name="ingress", num_replicas=cfg.ingress.replicas,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus, "num_gpus": cfg.ingress.num_gpus},
        # The ingress mostly awaits the model replicas; a low cap would starve the scorer's batches.
        max_ongoing_requests=256,
    ).bind(scorer, policy, policy_dir=str(targets.policy) if targets.policy else None, limits=cfg.limits,
           token_sha256=token_digest(token))
