"""Weights as (HF name, tensor) pairs and the safetensors checkpoint directories that hold them: what the
policy learner exports, the weight-sync strategies move (apo_ray.weight_sync) and the rollout workers load.
Pure torch; no Ray."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

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


def tensor_bytes(named: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(tensor.numel() * tensor.element_size() for _, tensor in named)


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
