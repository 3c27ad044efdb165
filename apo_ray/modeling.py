"""Model-side plumbing shared by the learners: dtypes, tokenizers, dropout, batch encoding.

Causal-LM learners (policy, reference, critic) read token ids, never text: a policy sample is encoded
exactly as the rollout worker sampled it (`encode_samples`), so the learner trains on the tokens that were
drawn, special tokens included, and a response cut at the length limit gets no EOS. Text is encoded only
where text is the input: human-written responses (`text_samples`) and reward models, which may have
another tokenizer. Long dialogues (HH-RLHF) are truncated from the left so the end of the conversation and
the whole response survive; encoders count how many rows they truncated so the driver can report it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from apo_ray.chat import ChatFormat, reward_text
from apo_ray.config import RMPooling, resolve_dtype
from apo_ray.game import TokenSample


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a `model.dtype` / `rollout.dtype` name; "auto" by apo_ray.config.resolve_dtype's
    rule, the one every role follows."""
    return getattr(torch, resolve_dtype(name, on_gpu=device.type == "cuda"))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer class that the checkpoint's tokenizer_config.json names.

    transformers 5's AutoTokenizer swaps in Qwen2Tokenizer for every qwen2 model directory, whatever
    tokenizer was saved with it; on a word-level or WordPiece vocabulary that tokenizer garbles text.
    Learners and rollout workers load through this one function so they never tokenize differently.
    """
    import transformers

    config_file = Path(path) / "tokenizer_config.json"
    name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    tokenizer_cls = getattr(transformers, name, None) if name else None
    tokenizer = (tokenizer_cls or AutoTokenizer).from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    # 1 on response tokens (the ones a causal LM is trained or scored on); unused by the RM.
    response_mask: torch.Tensor
    n_truncated: int

    def to(self, device: torch.device) -> "EncodedBatch":
        return EncodedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.n_truncated
        )


def _pad(rows: list[list[int]], masks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        resp[i, : len(row)] = torch.tensor(mask)
    return ids, attn, resp


def encode_for_reward(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> EncodedBatch:
    """Prompt + response as one sequence for a sequence classifier (apo_ray.chat.reward_text), truncated from
    the left.

    The tokenizer truncates the text before adding its special tokens, so a BERT-style [CLS] survives.
    """
    texts = [reward_text(p, r) for p, r in zip(prompts, responses)]
    full_lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        rows = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    n_truncated = sum(full > max_length for full in full_lengths)
    ids, attn, resp = _pad(rows, [[0] * len(r) for r in rows], tokenizer.pad_token_id)
    return EncodedBatch(ids, attn, resp, n_truncated)


def text_samples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_prompt_tokens: int,
    max_response_tokens: int,
    eos_token_id: int | None = None,
    chat_template: str | None = None,
) -> list[TokenSample]:
    """Written (not sampled) prompt-response texts as token samples: the prompt as a rollout worker encodes it
    (rendered through `chat_template` if given, apo_ray.chat; cut as the worker cuts it), the response cut to
    max_response_tokens and ended with the template's end-of-turn token, else EOS (`eos_token_id`, by default
    the tokenizer's), since a written response is complete."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("text_samples: the tokenizer has no eos_token; pass eos_token_id (the model's EOS)")
    chat = ChatFormat(tokenizer, chat_template)
    return [TokenSample(tuple(chat.prompt_ids(prompt, max_prompt_tokens)[0]),
                        tuple(chat.response_ids(response, max_response_tokens, eos)))
            for prompt, response in zip(prompts, responses)]


def encode_samples(samples: list[TokenSample], pad_token_id: int) -> EncodedBatch:
    """Prompt + response ids as the sampler saw and wrote them, right-padded, with a mask on the response.

    Padding is told apart by length, not by id: a policy may sample the pad token itself."""
    for position, sample in enumerate(samples):
        if not sample.response_ids:
            raise ValueError(f"samples[{position}]: empty response; a sample has at least one token")
    rows = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    masks = [[0] * len(s.prompt_ids) + [1] * len(s.response_ids) for s in samples]
    ids, attn, resp = _pad(rows, masks, pad_token_id)
    return EncodedBatch(ids, attn, resp, n_truncated=0)


def predicted_response_tokens(sample: TokenSample) -> int:
    """Response tokens a causal LM predicts in `encode_samples`'s layout (the mask `response_token_logprobs`
    returns): all of them after a prompt; a first token with nothing before it is not predicted."""
    return len(sample.response_ids) - (0 if sample.prompt_ids else 1)


def response_token_logprobs(model: torch.nn.Module, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the response under a causal LM: ([B, T-1], mask [B, T-1])."""
    from apo_ray.losses import token_logprobs

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logprobs(logits, batch.input_ids), batch.response_mask[:, 1:]


class SampleLogprobs:
    """A causal LM's log-probs of token samples, as the policy (trainable) and the reference (frozen) both
    read them: each holds one, so neither role inherits the other."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int,
                 within: Callable[[], AbstractContextManager] = nullcontext):
        """`within`: the context every forward runs in (a LoRA policy's reference: its adapter switched off)."""
        self.model, self.pad_token_id, self.within = model, pad_token_id, within

    def with_grad(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = encode_samples(samples, self.pad_token_id).to(self.model.device)
        with self.within():
            return response_token_logprobs(self.model, batch)

    @torch.no_grad()
    def tokens(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of each response and the response mask, both [B, T-1] (float32, CPU)."""
        logps, mask = self.with_grad(samples)
        return logps.float().cpu(), mask.cpu()

    def sequences(self, samples: list[TokenSample], batch_size: int = 64) -> list[float]:
        from apo_ray.losses import sequence_logprob

        out: list[float] = []
        for i in range(0, len(samples), batch_size):
            logps, mask = self.tokens(samples[i : i + batch_size])
            out.extend(sequence_logprob(logps, mask, average=False).tolist())
        return out


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off for good, in train mode too: a PPO ratio or a DPO margin compares log-probs taken in
    train mode with ones taken in eval mode, and dropout makes them differ before any step. Attention
    dropout is a float that HF attention layers read from their config at build time, so the config's
    rates are zeroed before the model is built (`model_config`); this catches nn.Dropout layers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def model_config(path: str, trust_remote_code: bool, disable_dropout: bool, **overrides):
    """The model's config with `overrides`; with `disable_dropout`, every dropout rate (…dropout…, …pdrop… keys)
    set to 0."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
    if disable_dropout:
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    return config


def _pretrained(cls, path: str, dtype: str, trust_remote_code: bool, disable_dropout: bool, config=None):
    device = default_device()
    # Config overrides (num_labels) go into the config: from_pretrained refuses both.
    config = config if config is not None else model_config(path, trust_remote_code, disable_dropout)
    model = cls.from_pretrained(path, config=config, dtype=torch_dtype(dtype, device),
                                trust_remote_code=trust_remote_code)
    return (without_dropout(model) if disable_dropout else model).to(device)


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool = False, disable_dropout: bool = True) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return _pretrained(AutoModelForCausalLM, path, dtype, trust_remote_code, disable_dropout)


def load_reward_model(path: str, dtype: str, trust_remote_code: bool = False,
                      disable_dropout: bool = False, pooling: RMPooling | None = None) -> torch.nn.Module:
    """The RM at `path` with one score. `pooling` "mean" scores the mean token state of the encoder at `path`
    (apo_ray.mean_pooling), "native" the HF sequence classifier's own summary ([CLS] pooler, a decoder's last
    token); None, what the checkpoint was trained with (config.json's apo_ray_pooling, else native)."""
    from transformers import AutoModelForSequenceClassification

    from apo_ray.mean_pooling import POOLING_KEY, MeanPooledForSequenceClassification

    config = model_config(path, trust_remote_code, disable_dropout, num_labels=1)
    trained_with = getattr(config, POOLING_KEY, None)
    if pooling is not None and trained_with is not None and pooling != trained_with:
        raise ValueError(f"{path}: the RM there scores with pooling={trained_with}, not {pooling}")
    cls = MeanPooledForSequenceClassification if (pooling or trained_with) == "mean" else \
        AutoModelForSequenceClassification
    model = _pretrained(cls, path, dtype, trust_remote_code, disable_dropout, config=config)
    if model.config.pad_token_id is None:
        # Decoder RMs score the last non-pad token and need to know which id pads.
        tokenizer = load_tokenizer(path, trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def eos_token_ids(model_path: str, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        configured = None
    ids = set([configured] if isinstance(configured, int) else (configured or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
