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

    def to(self, device: torch.device) -> EncodedBatch:
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
    return [
        TokenSample(
            tuple(chat.prompt_ids(prompt, max_prompt_tokens)[0]),
            tuple(chat.response_ids(response, max_response_tokens, eos)),
        )
        for prompt, response in zip(prompts, responses)
    ]


def require_responses(samples: list[TokenSample]) -> None:
    """ValueError naming the first sample with an empty response: every layout of samples needs one token."""
    for position, sample in enumerate(samples):
        if not sample.response_ids:
            raise ValueError(f"samples[{position}]: empty response; a sample has at least one token")


def encode_samples(samples: list[TokenSample], pad_token_id: int) -> EncodedBatch:
    """Prompt + response ids as the sampler saw and wrote them, right-padded, with a mask on the response.

    Padding is told apart by length, not by id: a policy may sample the pad token itself."""
    require_responses(samples)
    rows = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    masks = [[0] * len(s.prompt_ids) + [1] * len(s.response_ids) for s in samples]
    ids, attn, resp = _pad(rows, masks, pad_token_id)
    return EncodedBatch(ids, attn, resp, n_truncated=0)


def predicted_response_tokens(sample: TokenSample) -> int:
    """Response tokens a causal LM predicts in `encode_samples`'s layout (the mask `response_token_logprobs`
    returns): all of them after a prompt; a first token with nothing before it is not predicted."""
    return len(sample.response_ids) - (0 if sample.prompt_ids else 1)


@dataclass(frozen=True)
class ResponseWindow:
    """Samples laid out so that a causal LM's output layer runs only where a response token is predicted.

    Prompts are left-padded to the longest prompt (P) and responses follow from column P, right-padded to the
    longest response (R); position ids count real tokens only, so every real token sits where it sits in
    `encode_samples`'s right-padded row. Every row's response is then predicted from columns P-1 .. P+R-2, and
    the model's `logits_to_keep` computes the head on the last `keep` columns alone. In an online round most
    positions are prompt: a [T, vocab] head and its float32 log-softmax per row are the largest single cost of
    a small model's forward, and only the response's share of them is ever read.

    `rows`, `out_columns` and `in_columns` carry each predicted response token from the kept log-probs
    ([B, keep - 1]) to `encode_samples`'s [B, T-1] grid, the layout the driver's per-token grids use."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: int
    width: int  # encode_samples' T - 1
    rows: torch.Tensor
    out_columns: torch.Tensor
    in_columns: torch.Tensor

    @classmethod
    def of(cls, samples: list[TokenSample], pad_token_id: int) -> ResponseWindow:
        require_responses(samples)
        prompt_width = max(len(s.prompt_ids) for s in samples)
        response_width = max(len(s.response_ids) for s in samples)
        ids = torch.full((len(samples), prompt_width + response_width), pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        # The first kept column predicts the first response token; with no prompt at all, nothing predicts it.
        start = max(prompt_width - 1, 0)
        rows, out_columns, in_columns = [], [], []
        for i, sample in enumerate(samples):
            p, r = len(sample.prompt_ids), len(sample.response_ids)
            ids[i, prompt_width - p : prompt_width + r] = torch.tensor(
                list(sample.prompt_ids) + list(sample.response_ids)
            )
            attn[i, prompt_width - p : prompt_width + r] = 1
            for j in range(0 if p else 1, r):
                rows.append(i)
                out_columns.append(p - 1 + j)
                in_columns.append(prompt_width - 1 + j - start)
        positions = (attn.cumsum(dim=1) - 1).masked_fill(attn == 0, 1)
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples) - 1
        return cls(
            ids,
            attn,
            positions,
            prompt_width + response_width - start,
            width,
            torch.tensor(rows),
            torch.tensor(out_columns),
            torch.tensor(in_columns),
        )

    def mask(self) -> torch.Tensor:
        """1 where a response token is predicted in the [B, T-1] grid: `encode_samples`'s response_mask[:, 1:]."""
        grid = torch.zeros((len(self.input_ids), self.width), dtype=torch.long)
        grid[self.rows, self.out_columns] = 1
        return grid


@dataclass
class ResponseForward:
    """A causal LM's forward over a ResponseWindow: the response's token log-probs in `encode_samples`'s grid
    (`logps`, 0 off the response; `mask`), and the kept logits ([B, keep, V]) with `logits_mask` ([B, keep - 1],
    1 where a kept column predicts a response token) for statistics such as the entropy."""

    logps: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    logits_mask: torch.Tensor


def response_forward(model: torch.nn.Module, samples: list[TokenSample], pad_token_id: int) -> ResponseForward:
    from apo_ray.losses import token_logprobs

    window = ResponseWindow.of(samples, pad_token_id)
    device = next(model.parameters()).device
    logits = model(
        input_ids=window.input_ids.to(device),
        attention_mask=window.attention_mask.to(device),
        position_ids=window.position_ids.to(device),
        logits_to_keep=window.keep,
    ).logits
    kept = token_logprobs(logits, window.input_ids[:, -window.keep :].to(device))
    rows, out_columns, in_columns = (t.to(device) for t in (window.rows, window.out_columns, window.in_columns))
    grid = kept.new_zeros((len(samples), window.width)).index_put((rows, out_columns), kept[rows, in_columns])
    logits_mask = torch.zeros(kept.shape, dtype=torch.long, device=device)
    logits_mask[rows, in_columns] = 1
    return ResponseForward(grid, window.mask().to(device), logits, logits_mask)


def response_token_logprobs(
    model: torch.nn.Module, samples: list[TokenSample], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each sample's response under a causal LM, in `encode_samples`'s grid:
    ([B, T-1] with 0 off the response, mask [B, T-1]); the head runs on the responses only (ResponseWindow)."""
    forward = response_forward(model, samples, pad_token_id)
    return forward.logps, forward.mask


class SampleLogprobs:
    """A causal LM's log-probs of token samples, as the policy (trainable) and the reference (frozen) both
    read them: each holds one, so neither role inherits the other."""

    def __init__(
        self, model: torch.nn.Module, pad_token_id: int, within: Callable[[], AbstractContextManager] = nullcontext
    ):
        """`within`: the context every forward runs in (a LoRA policy's reference: its adapter switched off)."""
        self.model, self.pad_token_id, self.within = model, pad_token_id, within

    def forward(self, samples: list[TokenSample]) -> ResponseForward:
        with self.within():
            return response_forward(self.model, samples, self.pad_token_id)

    def with_grad(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        forward = self.forward(samples)
        return forward.logps, forward.mask

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
    model = cls.from_pretrained(
        path, config=config, dtype=torch_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    return (without_dropout(model) if disable_dropout else model).to(device)


def load_causal_lm(
    path: str, dtype: str, trust_remote_code: bool = False, disable_dropout: bool = True
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return _pretrained(AutoModelForCausalLM, path, dtype, trust_remote_code, disable_dropout)


def load_reward_model(
    path: str,
    dtype: str,
    trust_remote_code: bool = False,
    disable_dropout: bool = False,
    pooling: RMPooling | None = None,
) -> torch.nn.Module:
    """The RM at `path` with one score. `pooling` "mean" scores the mean token state of the encoder at `path`
    (apo_ray.mean_pooling), "native" the HF sequence classifier's own summary ([CLS] pooler, a decoder's last
    token); None, what the checkpoint was trained with (config.json's apo_ray_pooling, else native)."""
    from transformers import AutoModelForSequenceClassification

    from apo_ray.mean_pooling import POOLING_KEY, MeanPooledForSequenceClassification

    config = model_config(path, trust_remote_code, disable_dropout, num_labels=1)
    trained_with = getattr(config, POOLING_KEY, None)
    if pooling is not None and trained_with is not None and pooling != trained_with:
        raise ValueError(f"{path}: the RM there scores with pooling={trained_with}, not {pooling}")
    cls = (
        MeanPooledForSequenceClassification
        if (pooling or trained_with) == "mean"
        else AutoModelForSequenceClassification
    )
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
