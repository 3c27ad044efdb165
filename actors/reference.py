"""ReferenceModel: a frozen copy of the initial policy, for the KL term and DPO's reference log-probs."""

from __future__ import annotations

import torch

from apo_ray.config import ModelConfig
from apo_ray.losses import sequence_logprob
from apo_ray.modeling import encode_for_lm, load_causal_lm, load_tokenizer, response_token_logprobs


class ReferenceModel:
    def __init__(self, model_path: str, *, model: ModelConfig):
        self.model_cfg = model
        self.tokenizer = load_tokenizer(model_path, model.trust_remote_code)
        self.model = load_causal_lm(model_path, model.dtype, model.trust_remote_code).eval()

    @torch.no_grad()
    def token_logprobs(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = encode_for_lm(
            self.tokenizer, prompts, responses, self.model_cfg.max_prompt_tokens, self.model_cfg.max_response_tokens
        ).to(self.model.device)
        logps, mask = response_token_logprobs(self.model, batch)
        return logps.cpu(), mask.cpu()

    def sequence_logprobs(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            logps, mask = self.token_logprobs(prompts[i : i + batch_size], responses[i : i + batch_size])
            out.extend(sequence_logprob(logps, mask, average=False).tolist())
        return out
