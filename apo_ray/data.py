"""Loading and validating the game's data: preference pairs, golden answers and policy prompts.

Sources are JSONL files, HH-RLHF dialogue files, or HF `datasets` (hub name, saved dataset directory or a
data file). Every problem raises `DataError` naming the file and line (or dataset and row) before any
model loads.

HH-RLHF convention (decided here, used everywhere): the prompt of a pair is the dialogue both sides share,
up to and including its last "\\n\\nAssistant:"; each response is the rest of its dialogue, verbatim (it
keeps its leading space). So `prompt + response` rebuilds exactly the text the labellers judged, and a BPE
tokenizer sees the space where it expects it. Using the *shared* prefix rather than each dialogue's own
last "Assistant:" matters: some responses contain "\\n\\nAssistant:" themselves (3 of the 1,812 real
pairs), and splitting each dialogue on its own would give the two sides different prompts.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from apo_ray.game import GoldAnswer, PreferencePair

T = TypeVar("T")

HH_ASSISTANT = "\n\nAssistant:"
MAX_LINE_CHARS = 1_000_000
SPLIT_KEYS = ("pairs", "gold", "prompts", "eval")
_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DataError(ValueError):
    """Bad input data; the message names the file and line (or dataset and row) and the problem."""


class DataSource(Protocol):
    """What the loaders read from a source config (apo_ray.config.DataSourceConfig)."""

    path: str
    format: str
    split: str
    prompt_key: str
    chosen_key: str
    rejected_key: str
    response_key: str
    skip: int
    limit: int | None
    data_dir: str | None


class DataSettings(Protocol):
    """What build_game_data reads from the data config (apo_ray.config.DataConfig)."""

    task: str
    source: DataSource | None
    pairs: DataSource | None
    gold: DataSource | None
    prompts: DataSource | None
    eval_pairs: DataSource | None
    split_fractions: Mapping[str, float]


# ---------------------------------------------------------------- JSONL


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_fields(record: Mapping[str, Any], fields: Sequence[str], where: str) -> None:
    for name in fields:
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {_type_name(record[name])}")


def iter_jsonl(
    path: str, required_fields: Sequence[str], *, max_line_chars: int = MAX_LINE_CHARS
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line, streaming.

    Every object must carry `required_fields` as strings. Raises DataError for a missing or unreadable
    file, an empty file, an over-long line, invalid UTF-8 or JSON, a non-object line, or a bad field.
    """
    try:
        # Binary lines, decoded one at a time: a text reader decodes ahead in chunks and would blame
        # bad bytes on an earlier line.
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSONL file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot open file ({exc.strerror})") from None
    # A character is at most 4 UTF-8 bytes, so a line over this many bytes is over the limit for sure;
    # the cap keeps a runaway line out of memory.
    max_line_bytes = 4 * max_line_chars + 2
    with handle:
        seen_record = False
        for line_no, raw in enumerate(iter(lambda: handle.readline(max_line_bytes), b""), start=1):
            where = f"{path}:{line_no}"
            too_long = f"{where}: line longer than {max_line_chars:,} characters"
            if len(raw) == max_line_bytes and not raw.endswith(b"\n"):
                raise DataError(too_long)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: line is not valid UTF-8 ({exc.reason})") from None
            if len(line.rstrip("\r\n")) > max_line_chars:
                raise DataError(too_long)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # Some messages end in "at" ("Unterminated string starting at"): make the column follow.
                column = f"column {exc.colno}" if exc.msg.endswith(" at") else f"at column {exc.colno}"
                hint = "" if line.endswith("\n") else "; the file may be truncated"
                raise DataError(f"{where}: line is not valid JSON ({exc.msg} {column}){hint}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: line is a JSON {_type_name(record)}, expected an object")
            _check_fields(record, required_fields, where)
            seen_record = True
            yield line_no, record
        if not seen_record:
            raise DataError(f"{path}: file is empty")


def read_jsonl(
    path: str, required_fields: Sequence[str], *, max_line_chars: int = MAX_LINE_CHARS
) -> list[dict[str, Any]]:
    """All objects of a JSONL file, checked as in `iter_jsonl`."""
    return [record for _, record in iter_jsonl(path, required_fields, max_line_chars=max_line_chars)]


# ---------------------------------------------------------------- HH-RLHF dialogues


def parse_hh_dialogue(text: str) -> tuple[str, str]:
    """Split one HH dialogue into (prompt up to and including its last "\\n\\nAssistant:", rest verbatim)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("dialogue has no '\\n\\nAssistant:' turn")
    end = cut + len(HH_ASSISTANT)
    return text[:end], text[end:]


def split_hh_pair(chosen: str, rejected: str) -> PreferencePair:
    """Pair two HH dialogues on the prompt they share (see the module docstring)."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise ValueError(f"{name} dialogue has no '\\n\\nAssistant:' turn")
    shared = len(os.path.commonprefix([chosen, rejected]))
    try:
        prompt, _ = parse_hh_dialogue(chosen[:shared])
    except ValueError:
        raise ValueError("chosen and rejected differ before their first '\\n\\nAssistant:' turn") from None
    return PreferencePair(prompt=prompt, chosen=chosen[len(prompt) :], rejected=rejected[len(prompt) :])


def _window(records: Iterable[T], skip: int, limit: int | None, label: str) -> Iterator[T]:
    """Records skip .. skip + limit (to the end without a limit); a skip past the last record is an error, not
    an empty source."""
    empty = True
    for record in itertools.islice(records, skip, None if limit is None else skip + limit):
        empty = False
        yield record
    if empty and skip:
        raise DataError(f"{label}: skip={skip} passes the last record")


def _hh_pairs(
    records: Iterable[tuple[str, Mapping[str, Any]]], chosen_key: str, rejected_key: str
) -> list[PreferencePair]:
    pairs = []
    for where, record in records:
        try:
            pairs.append(split_hh_pair(record[chosen_key], record[rejected_key]))
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
    return pairs


def load_hh_pairs(
    path: str, *, chosen_key: str = "chosen", rejected_key: str = "rejected", skip: int = 0, limit: int | None = None
) -> list[PreferencePair]:
    """Preference pairs from an HH-RLHF JSONL file of {"chosen": dialogue, "rejected": dialogue} lines."""
    lines = _window(iter_jsonl(path, (chosen_key, rejected_key)), skip, limit, path)
    return _hh_pairs(((f"{path}:{line_no}", record) for line_no, record in lines), chosen_key, rejected_key)


# ---------------------------------------------------------------- HF datasets


def _hf_label(src: DataSource) -> str:
    subset = f" {src.data_dir}" if src.data_dir else ""
    return f"dataset {src.path!r}{subset} [{src.split}]"


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _load_hf_dataset(src: DataSource) -> Any:
    """src.path as a directory made by `save_to_disk`, a local data file, or anything `load_dataset` takes."""
    import datasets

    path, split = src.path, src.split
    try:
        if os.path.isdir(path) and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{_hf_label(src)}: no split {split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        if os.path.isfile(path):
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in _HF_FILE_BUILDERS:
                known = ", ".join(_HF_FILE_BUILDERS)
                raise DataError(f"{_hf_label(src)}: unknown data file type {suffix!r} ({known})")
            return datasets.load_dataset(_HF_FILE_BUILDERS[suffix], data_files={split: path}, split=split)
        return datasets.load_dataset(path, data_dir=src.data_dir, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types; all mean "cannot load it"
        raise DataError(f"{_hf_label(src)}: cannot load ({type(exc).__name__}: {exc})") from exc


def _iter_hf(src: DataSource, fields: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    dataset = _load_hf_dataset(src)
    label = _hf_label(src)
    missing = [name for name in fields if name not in dataset.column_names]
    if missing:
        raise DataError(f"{label}: missing field {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise DataError(f"{label}: dataset is empty")
    for index, row in enumerate(dataset):
        where = f"{label} row {index}"
        _check_fields(row, fields, where)
        yield where, row


# ---------------------------------------------------------------- loaders by format


def _records(src: DataSource, fields: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for records src.skip .. src.skip + src.limit of a jsonl or hf source."""
    if src.format == "jsonl":
        records: Iterable[tuple[str, dict[str, Any]]] = (
            (f"{src.path}:{line_no}", record) for line_no, record in iter_jsonl(src.path, fields)
        )
    elif src.format == "hf":
        records = _iter_hf(src, fields)
    else:
        raise DataError(f"{src.path}: unknown data format {src.format!r} (jsonl, hh, hf)")
    return _window(records, src.skip, src.limit, src.path if src.format == "jsonl" else _hf_label(src))


def _prompt(record: Mapping[str, Any], key: str, where: str) -> str:
    if not record[key].strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return record[key]


def _first_per_prompt(items: Iterable[T], prompt_of: Callable[[T], str]) -> list[T]:
    seen: set[str] = set()
    kept = []
    for item in items:
        prompt = prompt_of(item)
        if prompt not in seen:
            seen.add(prompt)
            kept.append(item)
    return kept


def load_pairs(src: DataSource) -> list[PreferencePair]:
    """Preference pairs (prompt, chosen, rejected) from a jsonl, hh or hf source."""
    if src.format == "hh" and not os.path.exists(src.path):
        # HH dialogues from a hub dataset (Anthropic/hh-rlhf, data_dir harmless-base): rows instead of lines.
        records = _window(_iter_hf(src, (src.chosen_key, src.rejected_key)), src.skip, src.limit, _hf_label(src))
        return _hh_pairs(records, src.chosen_key, src.rejected_key)
    if src.format == "hh":
        return load_hh_pairs(
            src.path, chosen_key=src.chosen_key, rejected_key=src.rejected_key, skip=src.skip, limit=src.limit
        )
    keys = (src.prompt_key, src.chosen_key, src.rejected_key)
    return [
        PreferencePair(_prompt(r, src.prompt_key, where), r[src.chosen_key], r[src.rejected_key])
        for where, r in _records(src, keys)
    ]


def load_gold(src: DataSource) -> list[GoldAnswer]:
    """Golden answers, one per prompt (the first one wins). From hh, the chosen side is the golden answer."""
    if src.format == "hh":
        answers = [GoldAnswer(prompt=p.prompt, response=p.chosen) for p in load_pairs(src)]
    else:
        keys = (src.prompt_key, src.response_key)
        answers = [
            GoldAnswer(prompt=_prompt(r, src.prompt_key, where), response=r[src.response_key])
            for where, r in _records(src, keys)
        ]
    return _first_per_prompt(answers, lambda answer: answer.prompt)


def load_prompts(src: DataSource) -> list[str]:
    """Distinct policy prompts in source order. From hh, the dialogue prefixes of the pairs."""
    if src.format == "hh":
        prompts = [p.prompt for p in load_pairs(src)]
    else:
        prompts = [_prompt(r, src.prompt_key, where) for where, r in _records(src, (src.prompt_key,))]
    return _first_per_prompt(prompts, lambda prompt: prompt)


# ---------------------------------------------------------------- the game's data sets


@dataclass
class GameData:
    """The paper's data: human pairs D_P, golden answers D_gold, policy prompts D_Q, held-out pairs."""

    pairs: list[PreferencePair]
    gold: list[GoldAnswer]
    prompts: list[str]
    eval_pairs: list[PreferencePair]

    def summary(self) -> dict[str, int]:
        """Counts of each set, and how many held-out pairs have a prompt also used for training."""
        training_prompts = {p.prompt for p in self.pairs} | {g.prompt for g in self.gold} | set(self.prompts)
        return {
            "pairs": len(self.pairs),
            "gold": len(self.gold),
            "prompts": len(self.prompts),
            "eval_pairs": len(self.eval_pairs),
            "eval_pairs_with_training_prompt": sum(p.prompt in training_prompts for p in self.eval_pairs),
        }


def split_by_prompt(pairs: Sequence[PreferencePair], fractions: Mapping[str, float], seed: int) -> GameData:
    """Split one pair set the paper's way, by prompt, so that no prompt lands in two sets.

    Distinct prompts are shuffled with `seed` and cut in the order pairs, gold, prompts, eval by the
    cumulative fractions (missing keys count as 0; the remainder is unused). A prompt in the gold share
    gives one golden answer: the chosen response of its first pair.
    """
    by_prompt: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair.prompt, []).append(pair)
    order = list(by_prompt)
    random.Random(seed).shuffle(order)
    shares: dict[str, list[str]] = {}
    start, cumulative = 0, 0.0
    for key in SPLIT_KEYS:
        cumulative += fractions.get(key, 0.0)
        end = min(len(order), round(cumulative * len(order)))
        shares[key] = order[start:end]
        start = end
    return GameData(
        pairs=[pair for prompt in shares["pairs"] for pair in by_prompt[prompt]],
        gold=[GoldAnswer(prompt=prompt, response=by_prompt[prompt][0].chosen) for prompt in shares["gold"]],
        prompts=list(shares["prompts"]),
        eval_pairs=[pair for prompt in shares["eval"] for pair in by_prompt[prompt]],
    )


# (GameData field = data config attribute, split_fractions key, what the set is)
_SETS = (
    ("pairs", "pairs", "human preference pairs"),
    ("gold", "gold", "golden answers"),
    ("prompts", "prompts", "policy prompts"),
    ("eval_pairs", "eval", "held-out pairs"),
)
_LOADERS = {"pairs": load_pairs, "gold": load_gold, "prompts": load_prompts, "eval_pairs": load_pairs}


def build_game_data(data_cfg: DataSettings, seed: int) -> GameData:
    """Load the four sets for task 'files': explicit sources win, the rest comes from splitting data.source.

    Raises DataError naming the config key when a set would be empty.
    """
    if data_cfg.task != "files":
        raise ValueError(f"data.task: build_game_data reads files, got task {data_cfg.task!r}")
    split, n_source_prompts = None, 0
    if data_cfg.source is not None and any(getattr(data_cfg, field) is None for field, _, _ in _SETS):
        source_pairs = load_pairs(data_cfg.source)
        n_source_prompts = len({pair.prompt for pair in source_pairs})
        split = split_by_prompt(source_pairs, data_cfg.split_fractions, seed)
    loaded = {}
    for field, fraction_key, what in _SETS:
        src = getattr(data_cfg, field)
        if src is not None:
            loaded[field] = _LOADERS[field](src)  # a loader never returns an empty set
            continue
        if split is None:
            raise DataError(f"data.{field}: no {what} (neither data.source nor data.{field} is set)")
        loaded[field] = getattr(split, field)
        if not loaded[field]:
            fraction = data_cfg.split_fractions.get(fraction_key, 0.0)
            raise DataError(
                f"data.{field}: no {what} (split_fractions.{fraction_key} is {fraction} of the "
                f"{n_source_prompts} prompts of data.source and data.{field} is not set)"
            )
    return GameData(**loaded)


# ---------------------------------------------------------------- cheap checks before any actor starts


def _check_source(src: DataSource, key: str) -> None:
    if src.format not in ("jsonl", "hh", "hf"):
        raise DataError(f"{key}.format: unknown data format {src.format!r} (jsonl, hh, hf)")
    if not src.path:
        raise DataError(f"{key}.path: empty")
    if src.format == "hf" or (src.format == "hh" and not os.path.exists(src.path) and is_hub_name(src.path)):
        _check_hf_path(src.path, key)
        return
    if not os.path.exists(src.path):
        raise DataError(f"{key}.path: {src.path}: file not found")
    if not os.path.isfile(src.path):
        raise DataError(f"{key}.path: {src.path}: not a regular file")
    if not os.access(src.path, os.R_OK):
        raise DataError(f"{key}.path: {src.path}: not readable")
    if os.path.getsize(src.path) == 0:
        raise DataError(f"{key}.path: {src.path}: file is empty")


def is_hub_name(name: str) -> bool:
    """Whether `name` has the shape of a Hugging Face hub id ("name" or "org/name"); no network is used."""
    return bool(_HUB_NAME.match(name))


def _check_hf_path(path: str, key: str) -> None:
    if os.path.exists(path):
        return
    looks_local = path.startswith((".", "/", "~")) or os.path.splitext(path)[1].lower() in _HF_FILE_BUILDERS
    if looks_local:
        raise DataError(f"{key}.path: {path}: local dataset not found")
    if not is_hub_name(path):
        raise DataError(f"{key}.path: {path!r} is neither a local path nor a hub dataset name")


def validate_sources(data_cfg: DataSettings) -> None:
    """Check that every configured source can be opened (files exist, are readable, are not empty).

    Hub dataset names are only checked for syntax: no network is assumed. Contents are checked by
    build_game_data, which the driver also runs before any model loads.
    """
    if data_cfg.task != "files":
        return
    for attr in ("source", "pairs", "gold", "prompts", "eval_pairs"):
        src = getattr(data_cfg, attr)
        if src is not None:
            _check_source(src, f"data.{attr}")
