"""Weights as (HF name, tensor) pairs, the safetensors checkpoint directories that hold them, and the flat
buckets the object-store sync moves them in: what the policy learner exports, the weight-sync strategies move
(apo_ray/sync_backends/) and the rollout workers load. Pure torch and numpy; no Ray."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NamedTensors = Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]


def as_named_tensors(weights: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    """A state dict or a list of (name, tensor) pairs, as a list of pairs."""
    pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    for position, pair in enumerate(pairs):
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], torch.Tensor)
        ):
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


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint directory's safetensors files; 0 for a path that is no directory here."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else 0


def read_checkpoint_dir(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of a checkpoint directory, one file at a time."""
    from safetensors.torch import load_file

    for file in checkpoint_files(path):
        yield from load_file(file).items()


def write_checkpoint_dir(named: Sequence[tuple[str, torch.Tensor]], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: tensor.detach().cpu().contiguous() for name, tensor in drop_shared_tensors(named)},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


# ---------------------------------------------------------------------------------------- weight buckets
# The object-store sync moves weights as a few bucket objects rather than one object per tensor: Ray pickles
# a torch tensor through torch's own serializer, once per tensor, while a numpy array travels out of band, and
# a reader on the node gets it as a view of shared memory, without a copy. A bucket holds uint8 numpy views of
# the weights themselves, so the one copy a sync makes on the learner's side is Ray's, into the object store
# (packing them into one flat buffer first cost a second copy: a third of the sync of a 100 MiB model, issue 12).


@dataclass(frozen=True)
class PackedTensor:
    """One tensor of a bucket, whose bytes are the bucket's array at the same position. `names` holds every
    name of it: tied weights (an embedding and the LM head) are one tensor under two names, packed once."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str  # torch's name for it: "float32", "bfloat16", ...
    nbytes: int


@dataclass(frozen=True)
class WeightBucket:
    tensors: tuple[PackedTensor, ...]
    # One flat uint8 array per tensor. Made by pack_buckets they are views of the weights they came from (the
    # caller puts the bucket into the object store, or uses it before the weights change); read back from the
    # object store they are read-only views of its shared memory.
    arrays: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.arrays)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _distinct_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[list[str], torch.Tensor]]:
    """(names, tensor) per distinct tensor, in first-seen order; names that share memory are grouped."""
    groups: dict[tuple, tuple[list[str], torch.Tensor]] = {}
    for position, (name, tensor) in enumerate(named):
        # Empty tensors all sit at address 0 without sharing anything.
        key = (
            ("empty", position)
            if tensor.numel() == 0
            else (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
        )
        groups.setdefault(key, ([], tensor))[0].append(name)
    return list(groups.values())


def _bytes_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array: a view for a contiguous CPU tensor, else a copy of it."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)


def pack_buckets(weights: NamedTensors, bucket_bytes: int) -> Iterator[WeightBucket]:
    """`weights` in buckets of at most `bucket_bytes` each (a tensor larger than that gets a bucket of its
    own), one bucket at a time, filled greedily in the weights' order."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be >= 1, got {bucket_bytes}")
    pending: list[tuple[PackedTensor, np.ndarray]] = []
    size = 0
    for names, tensor in _distinct_tensors(as_named_tensors(weights)):
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            yield WeightBucket(*map(tuple, zip(*pending)))
            pending, size = [], 0
        pending.append(
            (PackedTensor(tuple(names), tuple(tensor.shape), _dtype_name(tensor.dtype), nbytes), _bytes_view(tensor))
        )
        size += nbytes
    if pending:
        yield WeightBucket(*map(tuple, zip(*pending)))


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every name in `bucket`, each a view of its array (no copy; tied names share one)."""
    named = []
    for packed, array in zip(bucket.tensors, bucket.arrays, strict=True):
        dtype = getattr(torch, packed.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight bucket: {packed.names[0]!r} has unknown dtype {packed.dtype!r}")
        if packed.nbytes == 0:  # an empty array cannot be viewed as another dtype
            tensor = torch.empty(packed.shape, dtype=dtype)
        else:
            with warnings.catch_warnings():
                # The object store hands readers read-only arrays; the views are only read (loaded into an engine).
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tensor = torch.from_numpy(array).view(dtype).view(packed.shape)
        named += [(name, tensor) for name in packed.names]
    return named
