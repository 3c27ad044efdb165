import json
import os
import re
from pathlib import Path

import pytest

from apo_ray.config import DataConfig, DataSourceConfig
from apo_ray.data import (
    DataError,
    GameData,
    build_game_data,
    load_gold,
    load_hh_pairs,
    load_pairs,
    load_prompts,
    parse_hh_dialogue,
    read_jsonl,
    split_by_prompt,
    split_hh_pair,
    validate_sources,
)
from apo_ray.game import GoldAnswer, PreferencePair

# The workplace's real HH-RLHF pairs live beside the repository, never inside it.
HH_DIR = Path(__file__).resolve().parents[1] / "data" / "hh_harmless"
PAIR_FIELDS = ("prompt", "chosen", "rejected")


def write(tmp_path: Path, text: str | bytes, name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def pair_line(prompt: str = "p", chosen: str = "good", rejected: str = "bad", **extra) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}) + "\n"


def hh_line(chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": chosen, "rejected": rejected}) + "\n"


# ---------------------------------------------------------------- read_jsonl


def test_read_jsonl_skips_blank_lines_and_keeps_extra_fields(tmp_path):
    path = write(tmp_path, pair_line("a") + "\n   \n" + pair_line("b", note="x"))
    records = read_jsonl(path, PAIR_FIELDS)
    assert [r["prompt"] for r in records] == ["a", "b"]
    assert records[1]["note"] == "x"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            pair_line() + '{"prompt": "a", "cho',
            ":2: line is not valid JSON (Unterminated string starting at column 17); the file may be truncated",
        ),
        ('{"a": 1 "b": 2}\n', ":1: line is not valid JSON (Expecting ',' delimiter at column 9)"),
        (pair_line() + pair_line(chosen=3), ":2: field 'chosen' must be a string, got int"),
        (pair_line(rejected=None), ":1: field 'rejected' must be a string, got null"),
        (pair_line() + "\n" + '{"prompt": "p", "chosen": "c"}\n', ":3: missing field 'rejected'"),
        ("[1, 2]\n", ":1: line is a JSON list, expected an object"),
        ('"just a string"\n', ":1: line is a JSON str, expected an object"),
        ("", ": file is empty"),
        ("\n  \n\n", ": file is empty"),
        (pair_line().encode() + b'{"prompt": "\xff"}\n', ":2: line is not valid UTF-8 (invalid start byte)"),
    ],
    ids=[
        "truncated",
        "bad-json",
        "int-field",
        "null-field",
        "missing-field",
        "array",
        "string",
        "empty",
        "blank-lines-only",
        "bad-utf8",
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        read_jsonl(path, PAIR_FIELDS)
    assert str(err.value) == path + message


def test_read_jsonl_rejects_a_line_over_the_limit_but_accepts_one_at_it(tmp_path):
    at_limit = pair_line(chosen="x" * 20)
    limit = len(at_limit) - 1  # the newline does not count
    path = write(tmp_path, at_limit + pair_line(chosen="x" * 21))
    with pytest.raises(DataError) as err:
        read_jsonl(path, PAIR_FIELDS, max_line_chars=limit)
    assert str(err.value) == f"{path}:2: line longer than {limit:,} characters"
    assert len(read_jsonl(write(tmp_path, at_limit, "ok.jsonl"), PAIR_FIELDS, max_line_chars=limit)) == 1


def test_read_jsonl_limit_counts_characters_not_bytes(tmp_path):
    four_byte_char = "\U0001f600"
    at_limit = json.dumps({"s": four_byte_char * 10}, ensure_ascii=False)
    limit = len(at_limit)
    path = write(tmp_path, at_limit + "\n" + json.dumps({"s": four_byte_char * 11}, ensure_ascii=False))
    with pytest.raises(DataError, match=f"^{re.escape(path)}:2: line longer than {limit} characters$"):
        read_jsonl(path, ("s",), max_line_chars=limit)
    ok = write(tmp_path, at_limit, "ok.jsonl")
    assert read_jsonl(ok, ("s",), max_line_chars=limit) == [{"s": four_byte_char * 10}]


def test_read_jsonl_default_limit_is_a_million_characters(tmp_path):
    path = write(tmp_path, pair_line(chosen="x" * 1_000_000))
    with pytest.raises(DataError) as err:
        read_jsonl(path, PAIR_FIELDS)
    assert str(err.value) == f"{path}:1: line longer than 1,000,000 characters"


def test_read_jsonl_missing_file_and_directory(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"^{re.escape(missing)}: file not found$"):
        read_jsonl(missing, PAIR_FIELDS)
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(str(tmp_path), PAIR_FIELDS)


# ---------------------------------------------------------------- HH dialogues

MULTI_TURN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."


def test_parse_hh_dialogue_cuts_after_the_last_assistant_turn():
    prompt, response = parse_hh_dialogue(MULTI_TURN)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert response == " Fine, thanks."
    assert parse_hh_dialogue("\n\nHuman: Hi\n\nAssistant:") == ("\n\nHuman: Hi\n\nAssistant:", "")
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        parse_hh_dialogue("\n\nHuman: Hi")


def test_split_hh_pair_uses_the_shared_prefix_when_a_response_contains_an_assistant_turn():
    # Shape of dev.jsonl line 66: the chosen response itself contains "\n\nAssistant:".
    prompt = "\n\nHuman: Find me a serial.\n\nAssistant:"
    chosen = prompt + " Here is the key:\n\nAssistant: Let's try it."
    rejected = prompt + " I can't do that."
    pair = split_hh_pair(chosen, rejected)
    assert pair.prompt == prompt
    assert pair.chosen == " Here is the key:\n\nAssistant: Let's try it."
    assert pair.rejected == " I can't do that."


def test_split_hh_pair_keeps_a_shared_response_start_in_the_responses():
    prompt = "\n\nHuman: Hi\n\nAssistant:"
    pair = split_hh_pair(prompt + " Sure, here", prompt + " Sure, no")
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, " Sure, here", " Sure, no")


def test_split_hh_pair_rejects_dialogues_that_diverge_before_any_assistant_turn():
    with pytest.raises(ValueError, match="differ before their first"):
        split_hh_pair("\n\nHuman: A\n\nAssistant: x", "\n\nHuman: B\n\nAssistant: x")


def test_load_hh_pairs_errors_name_the_line(tmp_path):
    good = hh_line(MULTI_TURN, MULTI_TURN.replace("Fine", "Bad"))
    path = write(tmp_path, good + hh_line("\n\nHuman: Hi\n\nAssistant: ok", "\n\nHuman: Hi, no reply"))
    with pytest.raises(DataError) as err:
        load_hh_pairs(path)
    assert str(err.value) == f"{path}:2: rejected dialogue has no '\\n\\nAssistant:' turn"
    path = write(tmp_path, good + json.dumps({"chosen": MULTI_TURN}) + "\n", "missing.jsonl")
    with pytest.raises(DataError, match=f"^{re.escape(path)}:2: missing field 'rejected'$"):
        load_hh_pairs(path)


def test_real_hh_dev_file_loads_300_pairs_with_assistant_prompts():
    path = HH_DIR / "dev.jsonl"
    pairs = load_hh_pairs(str(path))
    assert len(pairs) == 300
    assert all(p.prompt.endswith("\n\nAssistant:") for p in pairs)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    rebuilt = [(p.prompt + p.chosen, p.prompt + p.rejected) for p in pairs]
    assert rebuilt == [(r["chosen"], r["rejected"]) for r in raw]
    # Line 66: the chosen response contains an "Assistant:" turn; both sides keep the same prompt.
    assert pairs[65].prompt.endswith("Yes, please find me a serial.\n\nAssistant:")
    assert pairs[65].chosen.startswith(" Alrighty")


def test_real_hh_train_file_loads_every_line():
    pairs = load_hh_pairs(str(HH_DIR / "train.jsonl"))
    assert len(pairs) == 1512
    assert len({p.prompt for p in pairs}) == 1510


# ---------------------------------------------------------------- loaders by format


def source(path: str, fmt: str = "jsonl", **kw) -> DataSourceConfig:
    return DataSourceConfig(path=path, format=fmt, **kw)


def test_jsonl_loaders_use_the_configured_keys_and_limit(tmp_path):
    rows = [{"q": f"q{i % 2}", "good": f"g{i}", "bad": f"b{i}", "ans": f"a{i}"} for i in range(4)]
    path = write(tmp_path, "".join(json.dumps(row) + "\n" for row in rows))
    keys = dict(prompt_key="q", chosen_key="good", rejected_key="bad", response_key="ans")
    assert load_pairs(source(path, limit=3, **keys)) == [
        PreferencePair("q0", "g0", "b0"),
        PreferencePair("q1", "g1", "b1"),
        PreferencePair("q0", "g2", "b2"),
    ]
    # One golden answer and one prompt per distinct prompt, the first occurrence winning.
    assert load_gold(source(path, **keys)) == [GoldAnswer("q0", "a0"), GoldAnswer("q1", "a1")]
    assert load_prompts(source(path, **keys)) == ["q0", "q1"]


def test_hh_source_gives_pairs_gold_from_chosen_and_dialogue_prompts(tmp_path):
    p1, p2 = "\n\nHuman: A\n\nAssistant:", "\n\nHuman: B\n\nAssistant:"
    sides = [(p1 + " yes", p1 + " no"), (p2 + " ok", p2 + " meh"), (p1 + " sure", p1 + " nah")]
    path = write(tmp_path, "".join(hh_line(chosen, rejected) for chosen, rejected in sides))
    src = source(path, "hh")
    assert load_pairs(src)[1] == PreferencePair(p2, " ok", " meh")
    assert load_gold(src) == [GoldAnswer(p1, " yes"), GoldAnswer(p2, " ok")]
    assert load_prompts(src) == [p1, p2]


def test_skip_and_limit_split_one_file_into_disjoint_sources(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    path = write(tmp_path, "".join(json.dumps(row) + "\n" for row in rows))
    head, tail = load_pairs(source(path, limit=3)), load_pairs(source(path, skip=3))
    assert [p.prompt for p in head] == ["p0", "p1", "p2"] and [p.prompt for p in tail] == ["p3", "p4"]
    assert [p.prompt for p in load_pairs(source(path, skip=1, limit=2))] == ["p1", "p2"]
    with pytest.raises(DataError, match=f"^{re.escape(path)}: skip=5 passes the last record$"):
        load_pairs(source(path, skip=5))


def test_hh_holdout_from_the_end_of_the_train_file_is_its_last_pairs():
    path = str(HH_DIR / "train.jsonl")
    every = load_hh_pairs(path)
    train, holdout = load_pairs(source(path, "hh", limit=1212)), load_pairs(source(path, "hh", skip=1212))
    assert train + holdout == every and len(holdout) == 300


def test_empty_prompt_is_rejected_with_its_line(tmp_path):
    path = write(tmp_path, pair_line() + pair_line(prompt="  "))
    with pytest.raises(DataError, match=f"^{re.escape(path)}:2: field 'prompt' is empty$"):
        load_pairs(source(path))


# ---------------------------------------------------------------- hf datasets (local, no hub)

ROWS = {"prompt": ["p0", "p1", "p2"], "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}


def test_hf_saved_dataset_directory_and_split(tmp_path):
    import datasets

    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load_pairs(source(str(tmp_path / "single"), "hf"))[2] == PreferencePair("p2", "c2", "r2")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(source(str(tmp_path / "dict"), "hf", split="test", limit=2)) == ["p0", "p1"]
    with pytest.raises(DataError, match=r"\[train\]: no split 'train' \(splits: test\)"):
        load_pairs(source(str(tmp_path / "dict"), "hf"))


def test_hf_data_file_and_row_errors(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, "".join(pair_line(f"p{i}") for i in range(3)), "pairs.jsonl")
    assert [p.prompt for p in load_pairs(source(path, "hf"))] == ["p0", "p1", "p2"]
    with pytest.raises(DataError) as err:
        load_gold(source(path, "hf"))
    assert str(err.value) == (f"dataset {path!r} [train]: missing field 'response' (columns: prompt, chosen, rejected)")

    nulls = str(tmp_path / "nulls")
    datasets.Dataset.from_dict({**ROWS, "chosen": ["c0", None, "c2"]}).save_to_disk(nulls)
    with pytest.raises(DataError) as err:
        load_pairs(source(nulls, "hf"))
    assert str(err.value) == f"dataset {nulls!r} [train] row 1: field 'chosen' must be a string, got null"


def test_hf_load_failure_is_wrapped_naming_the_dataset(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"^dataset '.*nothing' \[train\]: cannot load \(EmptyDatasetError"):
        load_pairs(source(str(tmp_path / "nothing"), "hf"))


# ---------------------------------------------------------------- the paper's split


def many_pairs(n_prompts: int) -> list[PreferencePair]:
    # Every third prompt has a second pair, to check that a prompt's pairs stay together.
    pairs = []
    for i in range(n_prompts):
        pairs.append(PreferencePair(f"p{i}", f"c{i}", f"r{i}"))
        if i % 3 == 0:
            pairs.append(PreferencePair(f"p{i}", f"c{i}b", f"r{i}b"))
    return pairs


FRACTIONS = {"pairs": 0.5, "gold": 0.2, "prompts": 0.2, "eval": 0.1}


def prompt_sets(data: GameData) -> dict[str, set[str]]:
    return {
        "pairs": {p.prompt for p in data.pairs},
        "gold": {g.prompt for g in data.gold},
        "prompts": set(data.prompts),
        "eval": {p.prompt for p in data.eval_pairs},
    }


def test_split_by_prompt_is_disjoint_sized_and_keeps_a_prompts_pairs_together():
    pairs = many_pairs(100)
    data = split_by_prompt(pairs, FRACTIONS, seed=1)
    sets = prompt_sets(data)
    assert {k: len(v) for k, v in sets.items()} == {"pairs": 50, "gold": 20, "prompts": 20, "eval": 10}
    assert len(set().union(*sets.values())) == 100
    per_prompt = {p: sum(q.prompt == p for q in pairs) for p in sets["pairs"] | sets["eval"]}
    assert len(data.pairs) + len(data.eval_pairs) == sum(per_prompt.values())
    # A gold answer is the chosen response of its prompt's first pair.
    assert all(g.response == "c" + g.prompt[1:] for g in data.gold)


def test_split_by_prompt_is_deterministic_by_seed_and_leaves_the_remainder_unused():
    pairs = many_pairs(100)
    assert split_by_prompt(pairs, FRACTIONS, seed=7) == split_by_prompt(pairs, FRACTIONS, seed=7)
    other_seed = split_by_prompt(pairs, FRACTIONS, seed=8)
    assert prompt_sets(split_by_prompt(pairs, FRACTIONS, seed=7)) != prompt_sets(other_seed)
    partial = split_by_prompt(pairs, {"pairs": 0.3, "eval": 0.1}, seed=0)
    assert (len({p.prompt for p in partial.pairs}), len(partial.gold), len(partial.prompts)) == (30, 0, 0)
    assert len({p.prompt for p in partial.eval_pairs}) == 10


# ---------------------------------------------------------------- build_game_data and validate_sources


def pairs_file(tmp_path: Path, n_prompts: int, name: str = "pairs.jsonl") -> str:
    lines = [pair_line(p.prompt, p.chosen, p.rejected) for p in many_pairs(n_prompts)]
    return write(tmp_path, "".join(lines), name)


def test_build_game_data_splits_the_source_and_explicit_sources_win(tmp_path):
    cfg = DataConfig(task="files", source=source(pairs_file(tmp_path, 40)), split_fractions=dict(FRACTIONS))
    data = build_game_data(cfg, seed=3)
    assert data.summary() == {
        "pairs": len(data.pairs),
        "gold": 8,
        "prompts": 8,
        "eval_pairs": len(data.eval_pairs),
        "eval_pairs_with_training_prompt": 0,
    }
    assert len({p.prompt for p in data.pairs}) == 20
    assert data == build_game_data(cfg, seed=3)

    # An explicit held-out file replaces the split's share; its prompt that is also a training prompt is
    # reported by the summary.
    seen = data.pairs[0].prompt
    held_out = write(tmp_path, pair_line(seen, "x", "y") + pair_line("new", "x", "y"), "eval.jsonl")
    with_eval = build_game_data(cfg.model_copy(update={"eval_pairs": source(held_out)}), seed=3)
    assert with_eval.eval_pairs == [PreferencePair(seen, "x", "y"), PreferencePair("new", "x", "y")]
    assert with_eval.pairs == data.pairs
    assert with_eval.summary()["eval_pairs_with_training_prompt"] == 1


def test_build_game_data_names_the_config_key_of_an_empty_set(tmp_path):
    cfg = DataConfig(
        task="files",
        source=source(pairs_file(tmp_path, 40)),
        split_fractions={"pairs": 0.8, "gold": 0.0, "prompts": 0.1, "eval": 0.1},
    )
    with pytest.raises(DataError) as err:
        build_game_data(cfg, seed=0)
    assert str(err.value) == (
        "data.gold: no golden answers (split_fractions.gold is 0.0 of the 40 prompts of data.source "
        "and data.gold is not set)"
    )
    path = pairs_file(tmp_path, 4)
    only_pairs = DataConfig(task="files", pairs=source(path), gold=source(path, response_key="chosen"))
    with pytest.raises(DataError) as err:
        build_game_data(only_pairs, seed=0)
    assert str(err.value) == "data.prompts: no policy prompts (neither data.source nor data.prompts is set)"
    with pytest.raises(ValueError, match="data.task"):
        build_game_data(DataConfig(task="builtin"), seed=0)


def test_build_game_data_reports_bad_lines_of_the_source(tmp_path):
    path = write(tmp_path, pair_line() + pair_line(chosen=1))
    with pytest.raises(DataError, match=f"^{re.escape(path)}:2: field 'chosen' must be a string, got int$"):
        build_game_data(DataConfig(task="files", source=source(path)), seed=0)


def test_validate_sources_checks_files_and_hub_name_syntax(tmp_path):
    hh_file = write(tmp_path, hh_line(MULTI_TURN, MULTI_TURN + "!"), "hh.jsonl")
    hub = source("Anthropic/hh-rlhf", "hf", split="test")
    validate_sources(DataConfig(task="files", source=source(hh_file, "hh"), eval_pairs=hub))
    cases = [
        (source(str(tmp_path / "gone.jsonl")), f"data.gold.path: {tmp_path / 'gone.jsonl'}: file not found"),
        (source(write(tmp_path, "", "e.jsonl")), f"data.gold.path: {tmp_path / 'e.jsonl'}: file is empty"),
        (source(str(tmp_path)), f"data.gold.path: {tmp_path}: not a regular file"),
        (source("./local_ds", "hf"), "data.gold.path: ./local_ds: local dataset not found"),
        (source("data.parquet", "hf"), "data.gold.path: data.parquet: local dataset not found"),
        (source("a b", "hf"), "data.gold.path: 'a b' is neither a local path nor a hub dataset name"),
        (source(""), "data.gold.path: empty"),
    ]
    for src, message in cases:
        with pytest.raises(DataError) as err:
            validate_sources(DataConfig(task="files", gold=src))
        assert str(err.value) == message


def test_validate_sources_reports_an_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = write(tmp_path, pair_line())
    os.chmod(path, 0)
    with pytest.raises(DataError, match="not readable"):
        validate_sources(DataConfig(task="files", pairs=source(path)))


def test_hh_from_a_hub_dataset_reads_its_subset_and_names_the_row(monkeypatch):
    # No hub here: the hub loader is replaced by one that serves the real dev rows, and records what it was asked.
    import datasets

    asked = {}
    rows = [json.loads(line) for line in (HH_DIR / "dev.jsonl").read_text().splitlines()[:5]]

    def load_dataset(path, data_dir=None, split=None):
        asked.update(path=path, data_dir=data_dir, split=split)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    src = DataSourceConfig(
        path="Anthropic/hh-rlhf", data_dir="harmless-base", split="test", format="hh", skip=1, limit=3
    )
    pairs = load_pairs(src)
    assert asked == {"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "test"}
    assert [p.prompt + p.chosen for p in pairs] == [r["chosen"] for r in rows[1:4]]
    rows[2]["chosen"] = "no assistant turn"
    with pytest.raises(DataError, match=r"^dataset 'Anthropic/hh-rlhf' harmless-base \[test\] row 2: chosen dialogue"):
        load_pairs(src)
