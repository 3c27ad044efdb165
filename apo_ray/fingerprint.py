"""Weight fingerprints: after a sync, each rollout worker proves that its engine holds the learner's weights.

A fingerprint holds, per tensor, the float64 sum and sum of squares of its values and its element count. Both
sides compute them from the values as the engine stores them: the learner casts its weights to the engines'
dtype first (the cast the engine's loader makes), the worker reads what its engine holds after the load. Sums do
not depend on layout, so they survive what an engine does to a checkpoint's tensors on load: vLLM fuses q, k, v
(and gate, up) into one parameter (whose sums are those of its parts) and transposes or packs a CPU GEMM's weight;
the rows it pads the vocabulary with the worker leaves out. The sum catches a sign or offset, the sum of squares a
scale; both catch a stale or missing tensor. A single element off by less than the tolerance is not caught: this is
a check that the sampler holds the policy, not a checksum of the bytes.

Tolerance: float64 sums of the same values in another order (a fused tensor, another kernel's reduction) differ
by rounding alone, at most about count * 2^-53 of the sum of magnitudes; REL_TOL allows 1e-7 of
sqrt(count * sum of squares), which bounds the sum of magnitudes, and 1e-7 of the sum of squares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

REL_TOL = 1e-7
# Values cast to float64 at a time (8 MiB); the chunks' sums add up in float64 like the whole tensor's.
CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorStats:
    total: float
    squares: float
    count: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorStats:
        # A chunk at a time in float64: a float64 copy of a whole embedding would take 4 to 8 times its own memory
        # beside the learner's export (or the engine). Both sides hand in contiguous tensors, whose flat view is free.
        flat = tensor.detach().flatten()
        total = squares = 0.0
        for start in range(0, flat.numel(), CHUNK):
            values = flat[start : start + CHUNK].double()
            total += values.sum().item()
            squares += torch.dot(values, values).item()
        return cls(total, squares, tensor.numel())

    def __add__(self, other: TensorStats) -> TensorStats:
        return TensorStats(self.total + other.total, self.squares + other.squares, self.count + other.count)

    def differs_from(self, reference: TensorStats) -> bool:
        if self.count != reference.count:
            return True
        total_tol = REL_TOL * math.sqrt(reference.count * reference.squares) + 1e-30
        squares_tol = REL_TOL * reference.squares + 1e-30
        return abs(self.total - reference.total) > total_tol or abs(self.squares - reference.squares) > squares_tol


Fingerprint = dict[str, TensorStats]
# What a worker reports: per engine parameter, the checkpoint names it holds and its stats.
EngineFingerprint = list[tuple[str, tuple[str, ...], TensorStats]]


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> Fingerprint:
    """The learner's side: each tensor as the engine stores it, i.e. cast to `dtype` (the engines' precision)."""
    return {name: TensorStats.of(tensor if dtype is None else tensor.to(dtype)) for name, tensor in named_tensors}


def checkpoint_names(engine_name: str, packed_modules: Mapping[str, list[str]]) -> tuple[str, ...]:
    """The checkpoint tensors an engine parameter holds: vLLM's `model.layers.0.self_attn.qkv_proj.weight` holds
    the q_proj, k_proj and v_proj weights (the model's packed_modules_mapping); any other parameter its own."""
    parts = engine_name.split(".")
    for position, part in enumerate(parts):
        if part in packed_modules:
            return tuple(".".join([*parts[:position], piece, *parts[position + 1 :]]) for piece in packed_modules[part])
    return (engine_name,)


def first_difference(reference: Fingerprint, reported: EngineFingerprint) -> str | None:
    """The first engine parameter whose stats differ from the reference's (the sum of its checkpoint tensors'), in
    words; None when every one matches."""
    for engine_name, names, stats in reported:
        missing = [name for name in names if name not in reference]
        if missing:
            return f"{engine_name}: the learner has no tensor {missing[0]!r}"
        expected = sum((reference[name] for name in names[1:]), reference[names[0]])
        if stats.differs_from(expected):
            return (
                f"{engine_name}: sum {stats.total:.9g}, sum of squares {stats.squares:.9g} over {stats.count} "
                f"values; the learner's {'+'.join(names)}: sum "
                f"{expected.total:.9g}, sum of squares {expected.squares:.9g} over {expected.count}"
            )
    return None
