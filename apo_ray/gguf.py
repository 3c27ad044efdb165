"""GGUF model files (llama.cpp's format) as plain Hugging Face model directories.

apo-ray's actors, DeepSpeed and vLLM all read a Hugging Face directory (safetensors, config.json, tokenizer).
transformers reads a GGUF file and de-quantizes it to float32, but the model it returns refuses
`save_pretrained` (it carries a GGUF quantization config), and doing that in every actor would cost each of
them the conversion. So the driver converts once, before Ray starts, into a cache keyed by the file's content
(sha256): `$APO_RAY_CACHE/gguf/<key>/`, else `~/.cache/apo_ray/gguf/<key>/` (the builtin task's cache root).
A second call with the same bytes, under any path or name, finds the directory.

`check_gguf` reads only the header (metadata and tensor table, not the tensors) so that a config check can
refuse a bad file in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from apo_ray.config import ConfigError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# llama.cpp's names for architectures transformers calls otherwise (its load_gguf_checkpoint renames them).
ARCHITECTURE_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
# GGUF metadata value types (gguf.GGUFValueType) with a fixed size, as struct formats.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    architecture: str
    version: int
    n_tensors: int
    # Bytes the file must hold: its data section ends with the last tensor.
    expected_size: int


class _Truncated(Exception):
    pass


class _HeaderReader:
    """Reads a GGUF header from a memory map in order; reading past the end raises _Truncated."""

    def __init__(self, buffer, byte_order: str, position: int):
        self.buffer, self.order, self.position = buffer, byte_order, position

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.position + size > len(self.buffer):
            raise _Truncated
        value = struct.unpack_from(self.order + fmt, self.buffer, self.position)[0]
        self.position += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.position + length > len(self.buffer):
            raise _Truncated
        self.position += length
        return bytes(self.buffer[self.position - length : self.position]).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            # Arrays (the vocabulary, merges) are only skipped: no header field apo-ray checks is one.
            if item_type in _SCALAR_FORMATS:
                self.position += count * struct.calcsize(_SCALAR_FORMATS[item_type])
            else:
                for _ in range(count):
                    self.value(item_type)
            return None
        raise ValueError(f"unknown metadata value type {value_type}")


def read_header(path: Path) -> GGUFHeader:
    """The architecture and expected size of the GGUF file `path`; ValueError / _Truncated / OSError if bad."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as stream:
        if stream.read(4) != GGUF_MAGIC:
            raise ValueError(
                "not a GGUF file (it does not start with the bytes 'GGUF'); a model file must be one, "
                "else name a Hugging Face model directory"
            )
        # A map, not reads: the vocabulary is 100,000s of short strings, and reading them one by one took seconds.
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            # The version is small; read the wrong way round it is huge, which tells a big-endian file.
            little = _HeaderReader(buffer, "<", 4)
            order = "<" if little.unpack("I") < 0x10000 else ">"
            reader = _HeaderReader(buffer, order, 4)
            version, n_tensors, n_fields = reader.unpack("I"), reader.unpack("Q"), reader.unpack("Q")
            fields = {}
            for _ in range(n_fields):
                key = reader.string()
                fields[key] = reader.value(reader.unpack("I"))
            data_end = 0
            for _ in range(n_tensors):
                reader.string()
                shape = [reader.unpack("Q") for _ in range(reader.unpack("I"))]
                tensor_type, offset = reader.unpack("I"), reader.unpack("Q")
                try:
                    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
                except (ValueError, KeyError):
                    raise ValueError(f"unknown tensor type {tensor_type}") from None
                data_end = max(data_end, offset + math.prod(shape) // block_size * block_bytes)
            alignment = fields.get("general.alignment") or DEFAULT_ALIGNMENT
            data_start = -(-reader.position // alignment) * alignment
    architecture = fields.get("general.architecture")
    if not isinstance(architecture, str):
        raise ValueError("its metadata names no general.architecture")
    return GGUFHeader(architecture, version, n_tensors, data_start + data_end)


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def check_gguf(path: str | Path, key: str | None = None) -> GGUFHeader:
    """The header of a GGUF file that transformers can load; a ConfigError naming `key` (if given), the file and
    the reason otherwise: unreadable, not GGUF, truncated, or an architecture transformers does not convert."""
    where = f"{key}: {path}" if key else str(path)
    try:
        header = read_header(Path(path))
        size = os.path.getsize(path)
    except OSError as exc:
        raise ConfigError(f"{where}: unreadable GGUF file ({exc.strerror or exc})") from None
    except _Truncated:
        raise ConfigError(f"{where}: truncated GGUF file (it ends inside its header)") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if size < header.expected_size:
        raise ConfigError(f"{where}: truncated GGUF file ({size} bytes; its tensors need {header.expected_size})")
    supported = supported_architectures()
    if ARCHITECTURE_ALIASES.get(header.architecture, header.architecture) not in supported:
        raise ConfigError(
            f"{where}: GGUF architecture {header.architecture!r} is not one transformers converts "
            f"({', '.join(supported)})"
        )
    return header


def content_key(path: str | Path) -> str:
    """sha256 of the file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_cache_root() -> Path:
    from apo_ray.builtin.assets import default_cache_dir

    return default_cache_dir() / "gguf"


def cached_dir(path: str | Path) -> Path:
    """Where hf_dir_from_gguf keeps (or will keep) the directory of `path`."""
    return gguf_cache_root() / content_key(path)


def hf_dir_from_gguf(path: str | Path, key: str | None = None) -> str:
    """A plain Hugging Face directory holding the model of the GGUF file `path` in float32: safetensors, its
    tokenizer with the chat template, config.json without the quantization config, generation_config.json with
    the tokenizer's EOS. Converted once per content; later calls return the cached directory.

    A conversion writes a temporary directory and renames it into place, so a killed one never leaves a
    directory that a later call would trust. Processes converting the same file take turns on a lock (flock:
    the kernel releases it when its holder dies), and the second one finds the first one's result.
    """
    check_gguf(path, key)
    target = cached_dir(path)
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return str(target)
        # Holding the lock, any partial directory of this key is a killed conversion's.
        for leftover in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        # Printed, as the stages and serve print their progress: neither configures logging.
        print(
            f"[gguf] converting {path} to a Hugging Face model directory in {target} (once per file content; "
            "about 30 s) ...",
            flush=True,
        )
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            _convert(Path(path), partial)
            partial.chmod(0o755)  # mkdtemp's 0o700 would hide the cache from the machine's other users
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    # The weights are de-quantized already; with this left in, transformers refuses to save the model.
    del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    if plain.generation_config.eos_token_id is None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
