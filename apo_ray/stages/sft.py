"""`apo-ray sft`: supervised fine-tuning of a causal LM on written (prompt, response) texts, the policy the
game starts from (and its reference model).

Responses are written text, so they are tokenized here and end with the model's EOS, or the chat template's
end-of-turn token when prompts are rendered through one (apo_ray.modeling.text_samples, apo_ray.chat): the same
encoding the game's learners give golden answers.
"""

from __future__ import annotations

import math

import torch

from apo_ray.chat import ChatFormat, resolve_template, template_setting
from apo_ray.config import ConfigError, SFTStageConfig
from apo_ray.data import load_gold
from apo_ray.game import GoldAnswer
from apo_ray.losses import sft_loss
from apo_ray.modeling import eos_token_ids, load_causal_lm, load_tokenizer, response_token_logprobs, text_samples
from apo_ray.stages.task import StageData, items_with_truncation


def eos_id(model_path: str, tokenizer) -> int:
    """The token that ends a written response: the tokenizer's EOS, else the model's generation config's."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    ids = eos_token_ids(model_path, tokenizer)
    if not ids:
        raise ConfigError(
            f"base_model: {model_path} names no EOS token (tokenizer or generation_config.json); "
            "a fine-tuned policy must learn to stop"
        )
    return min(ids)


def truncation_stats(
    chat: ChatFormat, examples: list[GoldAnswer], max_prompt_tokens: int, max_response_tokens: int
) -> dict[str, int]:
    prompts_cut = sum(chat.prompt_ids(e.prompt, max_prompt_tokens)[1] for e in examples)
    return {
        "examples": len(examples),
        "prompts_truncated": prompts_cut,
        "responses_truncated": sum(len(chat.response_tokens(e.response)) > max_response_tokens for e in examples),
    }


def load_sft_data(cfg: SFTStageConfig) -> StageData:
    tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    eos_id(cfg.base_model, tokenizer)
    chat = ChatFormat.for_setting(tokenizer, template_setting(cfg.chat_template, "chat_template"))
    # One response per prompt (the first), as for golden answers; from hh files, each pair's chosen side.
    return items_with_truncation(
        cfg,
        load_gold,
        lambda examples: truncation_stats(chat, examples, cfg.max_prompt_tokens, cfg.max_response_tokens),
    )


class SFTTask:
    unit = "examples"

    def __init__(self, cfg: SFTStageConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
        self.eos_id = eos_id(cfg.base_model, self.tokenizer)
        self.chat_template = resolve_template(template_setting(cfg.chat_template, "chat_template"), self.tokenizer)
        if self.chat_template is not None:
            # Saved with the model: the game renders prompts through the template the policy was tuned on.
            self.tokenizer.chat_template = self.chat_template
        if self.tokenizer.eos_token is None:
            # Saved with the model: the game's learners end written responses with the tokenizer's EOS.
            self.tokenizer.eos_token = self.tokenizer.convert_ids_to_tokens(self.eos_id)

    def load_model(self) -> torch.nn.Module:
        cfg = self.cfg
        return load_causal_lm(cfg.base_model, cfg.resolved_dtype, cfg.trust_remote_code, cfg.disable_dropout)

    def _token_logps(self, model: torch.nn.Module, examples: list[GoldAnswer]) -> tuple[torch.Tensor, torch.Tensor]:
        samples = text_samples(
            self.tokenizer,
            [e.prompt for e in examples],
            [e.response for e in examples],
            self.cfg.max_prompt_tokens,
            self.cfg.max_response_tokens,
            eos_token_id=self.eos_id,
            chat_template=self.chat_template,
        )
        return response_token_logprobs(model, samples, self.tokenizer.pad_token_id)

    def loss(self, model: torch.nn.Module, examples: list[GoldAnswer]) -> tuple[torch.Tensor, dict[str, float]]:
        logps, mask = self._token_logps(model, examples)
        loss = sft_loss(logps, mask)
        return loss, {"sft/loss": loss.item(), "sft/response_tokens": float(mask.sum().item())}

    @torch.no_grad()
    def eval_records(self, model: torch.nn.Module, examples: list[GoldAnswer]) -> list[tuple[float, float]]:
        """(summed negative log-likelihood, response tokens) per example."""
        out: list[tuple[float, float]] = []
        for start in range(0, len(examples), self.cfg.eval_batch_size):
            logps, mask = self._token_logps(model, examples[start : start + self.cfg.eval_batch_size])
            mask = mask.to(logps.dtype)
            out += list(zip((-(logps * mask).sum(1)).tolist(), mask.sum(1).tolist()))
        return out

    @staticmethod
    def eval_metrics(records: list[tuple[float, float]]) -> dict[str, float]:
        nll = sum(r[0] for r in records) / max(1.0, sum(r[1] for r in records))
        return {
            "sft/eval_loss": nll,
            "sft/eval_ppl": math.exp(min(nll, 50.0)),
            "sft/eval_examples": float(len(records)),
        }
