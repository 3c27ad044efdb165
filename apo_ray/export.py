"""`apo-ray export --merge SOURCE OUT`: a LoRA policy's adapter, as a round checkpoint holds it in PEFT's format
(docs/lora.md), merged into the base model that its adapter_config.json names and written to OUT as a plain Hugging
Face model with the policy's tokenizer: what a server or another trainer loads without peft. SOURCE is a game run
directory (its latest round's policy), a round checkpoint directory, or the adapter's directory itself."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apo_ray.checkpoint import LATEST
from apo_ray.config import ConfigError

ADAPTER_CONFIG = "adapter_config.json"


def adapter_dir(source: Path) -> Path:
    """The adapter directory that `source` holds or is."""
    latest = source / "checkpoints" / LATEST
    rounds = [source / "checkpoints" / f"round_{int(latest.read_text().strip()):04d}"] if latest.is_file() else []
    for candidate in (source, source / "policy", *(r / "policy" for r in rounds)):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ConfigError(
        f"{source}: no LoRA adapter ({ADAPTER_CONFIG}) here, in policy/ or in the latest round's "
        "policy/; export --merge merges a run trained with learner.lora.enabled"
    )


def merge_adapter(source: Path, out: Path) -> Path:
    """Write the merged model of the adapter `source` holds to `out`; returns `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_dir(source)
    base_path = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path, "config.json").is_file():
        raise ConfigError(
            f"{adapter / ADAPTER_CONFIG}: base_model_name_or_path {base_path!r} is not a Hugging Face "
            "model directory on this machine; the adapter is merged into the base model it was "
            "trained on"
        )
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    # peft's own merge: each adapted weight becomes W + (alpha / r) B A, the learners' merged weights.
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    return out


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="apo-ray export", description=__doc__)
    commands.add_argument(
        "--merge",
        action="store_true",
        required=True,
        help="merge the LoRA adapter into its base model (the one export built)",
    )
    commands.add_argument("source", type=Path, help="a game run directory, a round checkpoint or an adapter directory")
    commands.add_argument("out", type=Path, help="the directory the merged model is written to")
    return commands


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        print(f"merged model written to {merge_adapter(args.source, args.out)}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
