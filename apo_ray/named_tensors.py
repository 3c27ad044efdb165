"""Weights as (HF name, tensor) pairs, the safetensors checkpoint directories that hold them, and the flat
buckets the object-store sync moves them in: what the policy learner exports, the weight-sync strategies move
(apo_ray.weight_sync) and the rollout workers load. Pure torch and numpy; no Ray."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

NamedTensors = Union[Mapping[str, torch.Tensor], Sequence[tuple[str, torch.Tensor]]]


def as_named_tensors(weights: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    """A state dict or a list of (name, tensor) pairs, as a list of pairs."""
    pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    for position, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], torch.Tensor)):
            raise TypeError(f"weights[{position}]: expected a (name, torch.Tensor) pair, got {type(pair).__name__}")
    return pairs


def drop_shared_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Keep the first name of tensors that share memory (tied embeddings); safetensors refuses aliases."""
    seen, kept = set(), []
    for name, tensor in named:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            kept.append((name, tensor))
    return kept


def checkpoint_files(path: str | Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files; save the checkpoint with save_pretrained()")
    return files


def read_checkpoint_dir(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of a checkpoint directory, one file at a time."""
    from safetensors.torch import load_file

    for file in checkpoint_files(path):
        yield from load_file(file).items()


def write_checkpoint_dir(named: Sequence[tuple[str, torch.Tensor]], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in drop_shared_tensors(named)},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------- weight buckets
# The object-store sync moves weights as a few flat buffers rather than one object per tensor: Ray pickles a
# torch tensor through torch's own serializer, once per tensor, while a numpy array travels out of band and a
# reader on the node gets it as a view of shared memory, without a copy.

# Offsets are multiples of this, so that every dtype's view of the buffer is aligned.
BUCKET_ALIGNMENT = 64


@dataclass(frozen=True)
class PackedTensor:
    """Where one tensor lies in its bucket. `names` holds every name of it: tied weights (an embedding and
    the LM head) are one tensor under two names, packed once."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str  # torch's name for it: "float32", "bfloat16", ...
    offset: int  # bytes into the bucket's buffer
    nbytes: int


@dataclass(frozen=True)
class WeightBucket:
    tensors: tuple[PackedTensor, ...]
    buffer: np.ndarray  # flat uint8

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


def _aligned(offset: int) -> int:
    return -(-offset // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _distinct_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[list[str], torch.Tensor]]:
    """(names, tensor) per distinct tensor, in first-seen order; names that share memory are grouped."""
    groups: dict[tuple, tuple[list[str], torch.Tensor]] = {}
    for position, (name, tensor) in enumerate(named):
        # Empty tensors all sit at address 0 without sharing anything.
        key = (("empty", position) if tensor.numel() == 0 else
               (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype))
        groups.setdefault(key, ([], tensor))[0].append(name)
    return list(groups.values())


def pack_buckets(weights: NamedTensors, bucket_bytes: int) -> Iterator[WeightBucket]:
    """`weights` in flat buffers of at most `bucket_bytes` each (a tensor larger than that gets a bucket of its
    own), one bucket at a time, so the learner holds at most one bucket beside its weights."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be >= 1, got {bucket_bytes}")
    pending: list[tuple[list[str], torch.Tensor, int]] = []
    size = 0
    for names, tensor in _distinct_tensors(as_named_tensors(weights)):
        nbytes = tensor.numel() * tensor.element_size()
        offset = _aligned(size)
        if pending and offset + nbytes > bucket_bytes:
            yield _fill_bucket(pending, size)
            pending, offset = [], 0
        pending.append((names, tensor, offset))
        size = offset + nbytes
    if pending:
        yield _fill_bucket(pending, size)


def _fill_bucket(members: list[tuple[list[str], torch.Tensor, int]], size: int) -> WeightBucket:
    buffer = np.empty(size, dtype=np.uint8)
    flat = torch.from_numpy(buffer)
    packed = []
    for names, tensor, offset in members:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            flat[offset : offset + nbytes].copy_(tensor.detach().cpu().reshape(-1).view(torch.uint8))
        packed.append(PackedTensor(tuple(names), tuple(tensor.shape), _dtype_name(tensor.dtype), offset, nbytes))
    return WeightBucket(tuple(packed), buffer)


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every name in `bucket`, each a view of its buffer (no copy; tied names share one)."""
    with warnings.catch_warnings():
        # The object store hands readers a read-only array; the views are only read (loaded into an engine).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(bucket.buffer)
    named = []
    for packed in bucket.tensors:
        dtype = getattr(torch, packed.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight bucket: {packed.names[0]!r} has unknown dtype {packed.dtype!r}")
        if packed.nbytes == 0:  # an empty slice cannot be viewed as another dtype
            tensor = torch.empty(packed.shape, dtype=dtype)
        else:
            tensor = flat[packed.offset : packed.offset + packed.nbytes].view(dtype).view(packed.shape)
        named += [(name, tensor) for name in packed.names]
    return named
