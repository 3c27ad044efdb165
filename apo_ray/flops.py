"""How much arithmetic each phase of a round does, and how close to the machine it runs.

FLOPs here are model FLOPs, counted from the model's config and the tokens actually processed (padding is
not work, so a padded batch shows as lower efficiency): 2 per multiply-add of every weight matrix a token
passes through, plus attention's two products with the keys each token sees (causal: the tokens up to it;
an encoder: all of its sequence). Embedding look-ups, norms, activations and softmax are left out, as
everyone leaves them out. A training step is 3x its forward pass (the backward computes two products per
forward one); gradient checkpointing's second forward is not counted, since it is a way of spending, not
work. The ceiling is the best float32 2048x2048 matmul rate on the threads of the process that measures it;
`efficiency` is achieved FLOP/s over that.

`FlopCounter` counts a model's forwards from the attention masks they are called with, so learners need no
bookkeeping of their own: forward-only passes (no grad) and training forwards (grad) are kept apart.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import torch

# A training step's FLOPs over its forward pass's: the backward pass computes the gradients of both the
# activations and the weights, one product each per forward product.
TRAINING_FACTOR = 3
# Encoder model types whose MLP is two matrices (up, down) and whose attention sees the whole sequence; every
# other model type is read as a decoder with a gated MLP (gate, up, down: Llama, Qwen2, Mistral, SmolLM2).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "mpnet"})

Head = Literal["lm", "classifier"]


@dataclass(frozen=True)
class ModelShape:
    """What a transformer's FLOPs depend on. `head_outputs`: the vocabulary of a causal LM, the labels of a
    sequence classifier; a classifier's head is counted at every token, where the critic and decoder RMs run
    it (an encoder's [CLS] pooler, one matrix per sequence, is left out)."""

    layers: int
    hidden: int
    attention_width: int  # query heads x head dim
    kv_width: int  # key-value heads x head dim
    intermediate: int
    mlp_matrices: int  # 3 for a gated MLP, 2 otherwise
    head_outputs: int
    causal: bool

    @classmethod
    def from_config(cls, config, head: Head) -> ModelShape:
        """The shape of an HF model config (LlamaConfig, Qwen2Config, BertConfig, ...) under an LM or a
        classifier head. ValueError naming the config's missing field for any other layout."""
        model_type = getattr(config, "model_type", "")

        def field(name: str) -> int:
            value = getattr(config, name, None)
            if not isinstance(value, int):
                raise ValueError(
                    f"FLOP count: the {model_type or type(config).__name__} config has no integer "
                    f"{name!r}; only Llama-style decoders and BERT-style encoders are counted"
                )
            return value

        heads = field("num_attention_heads")
        head_dim = getattr(config, "head_dim", None) or field("hidden_size") // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        encoder = model_type in ENCODER_TYPES
        return cls(
            layers=field("num_hidden_layers"),
            hidden=field("hidden_size"),
            attention_width=heads * head_dim,
            kv_width=kv_heads * head_dim,
            intermediate=field("intermediate_size"),
            mlp_matrices=2 if encoder else 3,
            head_outputs=field("vocab_size") if head == "lm" else field("num_labels"),
            causal=not encoder,
        )

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> ModelShape:
        """An HF model's shape: an LM head if it has output embeddings, else a classifier's."""
        return cls.from_config(model.config, "lm" if model.get_output_embeddings() is not None else "classifier")

    @property
    def layer_params(self) -> int:
        """Weights of one layer's matrices: q, k, v, o and the MLP's."""
        attention = 2 * self.hidden * self.attention_width + 2 * self.hidden * self.kv_width
        return attention + self.mlp_matrices * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        return self.hidden * self.head_outputs

    def attention_flops(self, length: int) -> int:
        """Scores and weighted values of one sequence: 4 * width per (query, key) pair it computes."""
        pairs = length * (length + 1) // 2 if self.causal else length * length
        return 4 * self.layers * self.attention_width * pairs

    def forward_flops(self, length: int, head_positions: int | None = None) -> int:
        """One forward pass over a sequence of `length` tokens, the head run at `head_positions` of them (all
        by default: an HF forward computes every position's logits)."""
        head_positions = length if head_positions is None else head_positions
        return (
            2 * self.layers * self.layer_params * length
            + 2 * self.head_params * head_positions
            + self.attention_flops(length)
        )

    def generation_flops(self, prompt_tokens: int, response_tokens: int) -> int:
        """Sampling `response_tokens` after `prompt_tokens` with a KV cache: the prefill runs every prompt token
        (the head only at the last, which gives the first response token), then each response token but the
        last is fed back once and attends to everything before it. Exactly one causal forward over
        prompt + response - 1 tokens with the head at `response_tokens` positions."""
        if prompt_tokens < 1 or response_tokens < 1:
            raise ValueError(
                f"generation_flops: needs a prompt and a response token, got {prompt_tokens}, {response_tokens}"
            )
        return self.forward_flops(prompt_tokens + response_tokens - 1, head_positions=response_tokens)


def generation_flops(shape: ModelShape, prompt_lengths: list[int], response_lengths: list[int]) -> int:
    """The FLOPs of sampling each response after its prompt (one pair per sample; a group's shared prompt is
    counted once per sample, as a sampler without prefix caching computes it)."""
    return sum(shape.generation_flops(p, r) for p, r in zip(prompt_lengths, response_lengths, strict=True))


def efficiency(flops: float, seconds: float, ceiling: float) -> float:
    """Achieved FLOP/s as a share of `ceiling` (FLOP/s)."""
    if seconds <= 0 or ceiling <= 0:
        raise ValueError(f"efficiency: seconds and ceiling must be > 0, got {seconds}, {ceiling}")
    return flops / seconds / ceiling


def phase_efficiencies(stats: dict[str, float], ceilings: dict[str, float], round_ceiling: float) -> dict[str, float]:
    """`efficiency/<phase>` of every phase of a round's `stats` that has `flops/<phase>`, `timing/<phase>` and a
    ceiling in `ceilings` (FLOP/s of the processes that ran it); `flops/round`, the phases' sum, and its
    `efficiency/round` against `round_ceiling` (the machine's) over `timing/round`."""
    out: dict[str, float] = {}
    phases = [key.removeprefix("flops/") for key in stats if key.startswith("flops/") and key != "flops/round"]
    for phase in phases:
        seconds = stats.get(f"timing/{phase}", 0.0)
        if seconds > 0 and phase in ceilings:
            out[f"efficiency/{phase}"] = efficiency(stats[f"flops/{phase}"], seconds, ceilings[phase])
    if phases and stats.get("timing/round", 0.0) > 0:
        out["flops/round"] = float(sum(stats[f"flops/{phase}"] for phase in phases))
        out["efficiency/round"] = efficiency(out["flops/round"], stats["timing/round"], round_ceiling)
    return out


def matmul_ceiling(size: int = 2048, repeats: int = 3, threads: int | None = None) -> float:
    """The best of `repeats` float32 size x size matmuls, in FLOP/s, on this process's torch threads, or on
    `threads` of them (restored afterwards)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: thread pool and allocations
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def machine_threads() -> int:
    """The cores this process may run on. A driver started by `ray job submit` inherits OMP_NUM_THREADS=1 from
    Ray's job supervisor (an actor without CPUs, for which Ray sets it), so its own torch thread count says
    nothing about the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class FlopCounter:
    """Counts the forward FLOPs of an HF model from the attention masks its backbone (`base_model`, which the
    LM, the classifier and the critic's per-token values all call) receives: `inference` for passes without
    grad, `training` for the forwards of training steps. A causal LM's output layer is counted where it runs:
    on the real tokens of the last columns it is given (all of them, or the `logits_to_keep` last)."""

    def __init__(self, model: torch.nn.Module):
        self.shape = ModelShape.of_model(model)
        self.inference = 0
        self.training = 0
        self._mask: torch.Tensor | None = None
        head = model.get_output_embeddings()
        self._counts_head_apart = head is not None
        model.base_model.register_forward_pre_hook(self._count_backbone, with_kwargs=True)
        if head is not None:
            head.register_forward_pre_hook(self._count_head)

    def _add(self, flops: int) -> None:
        if torch.is_grad_enabled():
            self.training += flops
        else:
            self.inference += flops

    def _count_backbone(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        self._mask = mask if mask is not None and mask.dim() == 2 else None
        lengths = self._mask.sum(dim=1).tolist() if self._mask is not None else [tokens.shape[1]] * len(tokens)
        head_positions = 0 if self._counts_head_apart else None
        self._add(sum(self.shape.forward_flops(int(length), head_positions) for length in lengths))

    def _count_head(self, module: torch.nn.Module, args: tuple) -> None:
        hidden = args[0]
        columns = hidden.shape[-2]
        if self._mask is not None and self._mask.shape[0] == hidden.shape[0]:
            positions = int(self._mask[:, -columns:].sum())
        else:
            positions = hidden.shape[0] * columns
        self._add(2 * self.shape.head_params * positions)

    def take_inference(self) -> int:
        """The forward-only FLOPs counted since the last call."""
        flops, self.inference = self.inference, 0
        return flops
