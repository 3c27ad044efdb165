"""LoRA on a learner's model (peft): the adapter `learner.lora` configures, and the two views of an adapted model
that the rest of apo-ray reads: its merged weights under the base model's plain HF names (what the rollout workers
load, so that the sync and its fingerprint check are the ones without LoRA) and the adapter alone in PEFT's names
(what a checkpoint holds)."""

from __future__ import annotations

import torch

from apo_ray.config import ConfigError, LoraConfig

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
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"learner.lora.target_modules: {type(model).__name__} has no module named "
                          f"{', '.join(missing)}; its linear layers are {', '.join(linear)} (or use ['{ALL_LINEAR}'])")


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
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
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

    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(ADAPTER)
              for name, module in model.named_modules() if isinstance(module, LoraLayer)}
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
