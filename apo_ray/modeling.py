"""Model-side plumbing shared by the learners: dtypes, tokenizers, batch encoding with left truncation.

Long dialogues (HH-RLHF) are truncated from the left so the end of the conversation and the whole response
survive; encoders count how many rows they truncated so the driver can report it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    # Half precision is slow on CPU (DESIGN.md: 75 s vs 4.4 s per RM step), so "auto" means fp32 there.
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Prompt token ids exactly as the sampler sees them and the learners score them: no special tokens
    added (chat templates, when used, are part of the prompt text), cut from the left. Also says
    whether it cut."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:], len(ids) > max_prompt_tokens


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
    """Prompt + response as one sequence for a sequence classifier, truncated from the left.

    The tokenizer truncates the text before adding its special tokens, so a BERT-style [CLS] survives.
    """
    texts = [p + r for p, r in zip(prompts, responses)]
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


def encode_for_lm(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_prompt_tokens: int,
    max_response_tokens: int,
) -> EncodedBatch:
    """Prompt (left-truncated, as the sampler saw it) + response + EOS, with a mask on the response part."""
    rows, masks, n_truncated = [], [], 0
    for prompt, response in zip(prompts, responses):
        prompt_ids, truncated = encode_prompt(tokenizer, prompt, max_prompt_tokens)
        n_truncated += truncated
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:max_response_tokens]
        response_ids = response_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + response_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(response_ids))
    ids, attn, resp = _pad(rows, masks, tokenizer.pad_token_id)
    return EncodedBatch(ids, attn, resp, n_truncated)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Shuffled index batches; a seeded generator makes the order reproducible across a resume."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def response_token_logprobs(model: torch.nn.Module, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the response under a causal LM: ([B, T-1], mask [B, T-1])."""
    from apo_ray.losses import token_logprobs

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logprobs(logits, batch.input_ids), batch.response_mask[:, 1:]


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    return model.to(device)


def load_reward_model(path: str, dtype: str, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    device = default_device()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        # Decoder RMs score the last non-pad token and need to know which id pads.
        tokenizer = load_tokenizer(path, trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)
