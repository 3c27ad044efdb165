"""The builtin task's tokenizer, tiny policy and RM, and the initial policy's SFT (see apo_ray.builtin)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from apo_ray.builtin.oracle import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, VOCABULARY

# ---------------------------------------------------------------------------------------- tiny models


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over VOCABULARY; adds no special tokens on its own (like Qwen's)."""
    vocab = {word: index for index, word in enumerate(VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape shared by the tiny policy and RM. head_dim = hidden/heads must be >= 64 for vLLM on CPU.

    The models are Llama, not Qwen2: transformers 5 always loads a ``qwen2`` checkpoint's tokenizer as
    ``Qwen2Tokenizer``, which rebuilds a byte-level BPE and ignores this word-level tokenizer.json.
    """

    hidden_size: int = 128
    num_attention_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128


def _tiny_config(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, **extra: object) -> LlamaConfig:
    if spec.hidden_size // spec.num_attention_heads < 64:
        raise ValueError(
            f"TinyModelSpec: head_dim {spec.hidden_size // spec.num_attention_heads} < 64; "
            "vLLM's CPU attention kernels reject it"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
        **extra,
    )


def make_policy_model(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0
) -> Path:
    """Save a randomly initialised tiny Llama causal LM, with its tokenizer, to ``out_dir``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_config(tokenizer, spec))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return _save(model, tokenizer, out_dir)


def make_reward_model(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0
) -> Path:
    """Save a randomly initialised tiny Llama sequence classifier (num_labels=1) scoring the last non-pad token.

    Random rather than initialised from the SFT policy: on this task a BT-trained RM reached 0.715 held-out
    accuracy from random weights versus 0.655 from the SFT backbone (400 pairs, 6 epochs, lr 1e-3).
    """
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_tiny_config(tokenizer, spec, num_labels=1))
    return _save(model, tokenizer, out_dir)


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _sft_batch(
    tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside the response and its <eos>)."""
    rows = []
    for prompt, response in examples:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def sft_initial_policy(
    model_dir: str | Path,
    sft_data: tuple[tuple[str, str], ...],
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 32,
) -> Path:
    """Fine-tune the policy in ``model_dir`` in place with plain torch AdamW at a constant ``lr``; loss on response
    tokens only.

    The result imitates the behaviour distribution's words, always stops with <eos>, and names its prompt's
    topic about as often as its data does: the copy from the prompt forms after 200-300 steps at lr 1e-3 (seed 0:
    70% of its samples name the topic at 500 steps, its data 77%). At lr 3e-3 (before issue 11) it never formed,
    not even on data that always names the topic at the same place ("the <topic> is good": the topic's
    probability at its slot stayed 2% over 400 steps, against 98% at 1e-3): the model stayed at the solution that
    predicts each word from the one before it.
    """
    model_dir = Path(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    # This model's matmuls are too small to gain from threads, and on a busy machine two OpenMP threads
    # ran about 5x slower than one (measured: 1.0 s vs 0.2 s per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = rng.sample(list(sft_data), min(batch_size, len(sft_data)))
            input_ids, mask, labels = _sft_batch(tokenizer, batch)
            model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir)
    return model_dir
