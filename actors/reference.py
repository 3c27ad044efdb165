"""ReferenceModel: a frozen copy of the initial policy, for the KL term and DPO's reference log-probs.

It reads token samples (prompt and response ids as sampled), never re-encoded text (apo_ray.modeling)."""

from __future__ import annotations

import torch

from apo_ray.actors.engine import CountsFlops
from apo_ray.config import ModelConfig
from apo_ray.flops import FlopCounter
from apo_ray.game import TokenSample
from apo_ray.modeling import SampleLogprobs, load_causal_lm, load_tokenizer


class ReferenceModel(CountsFlops):
    def __init__(self, model_path: str, *, model: ModelConfig):
        tokenizer = load_tokenizer(model_path, model.trust_remote_code)
        lm = load_causal_lm(model_path, model.dtype, model.trust_remote_code, model.disable_dropout).eval()
        self.flop_counter = FlopCounter(lm)
        self.logprobs = SampleLogprobs(lm, tokenizer.pad_token_id)

    def token_logprobs(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logprobs.tokens(samples)

    def sequence_logprobs(self, samples: list[TokenSample]) -> list[float]:
        return self.logprobs.sequences(samples)
