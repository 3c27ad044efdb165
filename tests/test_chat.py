"""Chat templates on the real SmolLM2-135M-Instruct tokenizer (apo_ray/chat.py): prompts become exactly the
template's ids, written responses end with its end-of-turn token, and the RM reads the dialogue it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apo_ray.chat import ChatFormat, ChatTemplateError, messages_of, resolve_template, reward_text, template_setting
from apo_ray.data import load_hh_pairs
from apo_ray.modeling import load_tokenizer, text_samples

HH_DEV = Path(__file__).resolve().parents[1] / "data" / "hh_harmless" / "dev.jsonl"
DIALOGUE = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman:  How do I make tea? \n\nAssistant:"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatFormat.for_setting(tokenizer, "auto")


def test_an_hh_dialogue_becomes_its_turns_and_other_text_one_user_turn():
    assert messages_of(DIALOGUE) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How do I make tea?"},
    ]
    assert messages_of("  Write a haiku about rain.\n") == [{"role": "user", "content": "Write a haiku about rain."}]
    # Text that merely mentions a turn marker is not a dialogue.
    assert messages_of("Say '\n\nAssistant:'") == [{"role": "user", "content": "Say '\n\nAssistant:'"}]


def test_prompt_ids_are_exactly_the_templates_on_real_hh_dialogues(tokenizer, chat):
    pairs = load_hh_pairs(str(HH_DEV))[:40]
    for pair in pairs:
        expected = tokenizer.apply_chat_template(messages_of(pair.prompt), add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
        ids, cut = chat.prompt_ids(pair.prompt, 4096)
        assert ids == expected and not cut
        # The generation prompt is there: the ids end with "<|im_start|>assistant\n".
        assert tokenizer.decode(ids[-4:]) == "<|im_start|>assistant\n"


def test_a_long_dialogue_loses_whole_early_turns_and_keeps_the_system_prompt(tokenizer, chat):
    long_turn = "word " * 60
    prompt = f"\n\nHuman: {long_turn}\n\nAssistant: {long_turn}\n\nHuman: And now?\n\nAssistant:"
    full, _ = chat.prompt_ids(prompt, 4096)
    ids, cut = chat.prompt_ids(prompt, 64)
    assert cut and len(ids) <= 64 < len(full)
    assert (
        ids
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": "And now?"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )
    # One turn longer than the limit: its ids are cut from the left, the generation prompt survives.
    ids, cut = chat.prompt_ids(f"\n\nHuman: {long_turn * 3}\n\nAssistant:", 32)
    assert cut and len(ids) == 32 and tokenizer.decode(ids[-4:]) == "<|im_start|>assistant\n"


def test_written_responses_end_with_the_end_of_turn_token_the_sampler_stops_on(tokenizer, chat):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn_id == im_end and chat.stop_ids() == {im_end}
    [sample] = text_samples(tokenizer, [DIALOGUE], [" Boil water, then steep."], 256, 64, chat_template=chat.template)
    assert sample.prompt_ids == tuple(chat.prompt_ids(DIALOGUE, 256)[0])
    assert sample.response_ids[-1] == im_end
    assert tokenizer.decode(sample.response_ids) == "Boil water, then steep.<|im_end|>"
    # prompt + response is what the template renders for the whole conversation, up to the turn's newline.
    whole = tokenizer.apply_chat_template(
        [*messages_of(DIALOGUE), {"role": "assistant", "content": "Boil water, then steep."}], tokenize=True
    )["input_ids"]
    assert list(sample.prompt_ids + sample.response_ids) == whole[: len(sample.prompt_ids + sample.response_ids)]
    # A cut response still ends its turn: it is a complete written answer.
    [cut] = text_samples(tokenizer, [DIALOGUE], [" one two three four five six"], 256, 3, chat_template=chat.template)
    assert len(cut.response_ids) == 4 and cut.response_ids[-1] == im_end


def test_none_reads_prompts_as_raw_text(tokenizer):
    raw = ChatFormat.for_setting(tokenizer, "none")
    assert raw.template is None and raw.stop_ids() == frozenset()
    assert raw.prompt_ids(DIALOGUE, 4096)[0] == tokenizer(DIALOGUE, add_special_tokens=False)["input_ids"]
    [sample] = text_samples(tokenizer, [DIALOGUE], [" Tea."], 256, 8)
    assert tokenizer.decode(sample.response_ids) == " Tea." + tokenizer.eos_token


def test_a_template_file_is_read_and_a_bad_one_named(tmp_path, tokenizer):
    path = tmp_path / "plain.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    text = template_setting(str(path))
    fmt = ChatFormat.for_setting(tokenizer, text)
    assert tokenizer.decode(fmt.prompt_ids(DIALOGUE, 4096)[0]) == (
        "user: Hi there\nassistant: Hello! How can I help?\nuser: How do I make tea?\nassistant:"
    )
    # This template closes a turn with a bare newline, which answers contain too: written answers end with EOS.
    assert fmt.end_of_turn_id is None and fmt.stop_ids() == frozenset()
    assert fmt.response_ids(" Tea.", 8, tokenizer.eos_token_id)[-1] == tokenizer.eos_token_id
    assert template_setting("auto") == "auto" and resolve_template("auto", tokenizer) == tokenizer.chat_template
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=rf"^data.chat_template: {bad}:2: not a Jinja template"):
        template_setting(str(bad))
    with pytest.raises(ChatTemplateError, match=rf"^data.chat_template: {tmp_path / 'missing.jinja'}: cannot read"):
        template_setting(str(tmp_path / "missing.jinja"))


def test_the_reward_model_reads_the_hh_dialogue_with_the_sampled_answer():
    # An answer sampled through the template starts with no space; a human one does.
    assert reward_text(DIALOGUE, "Boil water.") == DIALOGUE + " Boil water."
    assert reward_text(DIALOGUE, " Boil water.") == DIALOGUE + " Boil water."
    assert reward_text("topic : river ; answer :", "calm") == "topic : river ; answer :calm"


def test_the_config_key_refuses_a_bad_template_before_anything_starts(tmp_path):
    from apo_ray.train import main

    bad = tmp_path / "t.jinja"
    bad.write_text("{% if %}")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": {"chat_template": "t.jinja"}, "run_dir": str(tmp_path / "run")}))
    assert main(["--config", str(config), "--dry-run"]) == 2
    assert not (tmp_path / "run").exists()


def test_the_sft_stage_encodes_hh_examples_as_the_game_encodes_golden_answers(smollm2_dir, tokenizer, chat):
    from apo_ray.config import SFTStageConfig
    from apo_ray.game import GoldAnswer
    from apo_ray.modeling import load_causal_lm, response_token_logprobs
    from apo_ray.stages.sft import SFTTask

    task = SFTTask(
        SFTStageConfig(
            base_model=smollm2_dir,
            train={"path": str(HH_DEV), "format": "hh"},
            max_prompt_tokens=256,
            max_response_tokens=32,
        )
    )
    assert task.tokenizer.chat_template == chat.template
    example = GoldAnswer(DIALOGUE, " Boil water, then steep.")
    model = load_causal_lm(smollm2_dir, "float32")
    logps, mask = task._token_logps(model, [example])
    # The game's encoding of the same golden answer: prompt through the template, answer, <|im_end|>.
    expected = text_samples(tokenizer, [DIALOGUE], [example.response], 256, 32, chat_template=chat.template)
    game_logps, game_mask = response_token_logprobs(model, expected, tokenizer.pad_token_id)
    assert mask.sum() == game_mask.sum() == len(expected[0].response_ids)
    assert torch.equal(logps[mask.bool()], game_logps[game_mask.bool()])
