"""ReferenceModel: a frozen copy of the initial policy, for the KL term and DPO's reference log-probs.

It reads token samples (prompt and response ids as sampled), never re-encoded text (apo_ray.modeling)."""

from __future__ import annotations

import torch

from apo_ray.config import ModelConfig
from apo_ray.game import TokenSample
from apo_ray.losses import sequence_logprob
from apo_ray.modeling import encode_samples, load_causal_lm, load_tokenizer, response_token_logprobs


class ReferenceModel:
    def __init__(self, model_path: str, *, model: ModelConfig):
        self.model_cfg = model
        self.tokenizer = load_tokenizer(model_path, model.trust_remote_code)
        self.model = load_causal_lm(model_path, model.dtype, model.trust_remote_code, model.disable_dropout).eval()

    def _logps(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = encode_samples(samples, self.tokenizer.pad_token_id).to(self.model.device)
        return response_token_logprobs(self.model, batch)

    @torch.no_grad()
    def token_logprobs(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of each response and the response mask, both [B, T-1] (float32)."""
        logps, mask = self._logps(samples)
        return logps.float().cpu(), mask.cpu()

    def sequence_logprobs(self, samples: list[TokenSample], batch_size: int = 64) -> list[float]:
        out: list[float] = []
        for i in range(0, len(samples), batch_size):
            logps, mask = self.token_logprobs(samples[i : i + batch_size])
            out.extend(sequence_logprob(logps, mask, average=False).tolist())
        return out
