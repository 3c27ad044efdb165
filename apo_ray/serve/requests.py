"""What a client may send to `apo-ray serve`, checked before any model sees it (pure, no Ray, no models).

Every refusal is a RequestError with an HTTP status and the field at fault (`[2].response`, `max_tokens`):
400 for a body that is not JSON of the right shape, 413 for anything over a size limit, 422 for a value of
the wrong type or outside its range. Nothing a client sends gets past these checks to a replica unless the
replica can handle it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from apo_ray.config import ServeLimitsConfig


class RequestError(ValueError):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": f"{self.field}: {self.message}"}}


@dataclass(frozen=True)
class ScoreItem:
    prompt: str
    response: str


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None


GENERATE_DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "n": 1, "seed": None}
MAX_SEED = 2**63 - 1


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def parse_json(body: bytes, limits: ServeLimitsConfig) -> Any:
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, "body", f"{len(body)} bytes; at most {limits.max_body_bytes}")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, "body", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, "body", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RequestError(400, "body", "JSON nested too deeply") from None


def _text(record: dict, key: str, where: str, limits: ServeLimitsConfig) -> str:
    field = f"{where}.{key}" if where else key
    if key not in record:
        raise RequestError(422, field, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise RequestError(422, field, f"must be a string, got {_type_name(value)}")
    if len(value) > limits.max_text_chars:
        raise RequestError(413, field, f"{len(value)} characters; at most {limits.max_text_chars}")
    return value


def _no_unknown_keys(record: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        field = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RequestError(400, field, f"unknown field (expected {', '.join(allowed)})")


def parse_score_request(payload: Any, limits: ServeLimitsConfig) -> list[ScoreItem]:
    """A JSON array of {"prompt": str, "response": str}, 1 to limits.max_score_items of them."""
    if not isinstance(payload, list):
        raise RequestError(400, "body", f"must be an array of {{prompt, response}} objects, got {_type_name(payload)}")
    if not payload:
        raise RequestError(422, "body", "empty array; send at least one {prompt, response}")
    if len(payload) > limits.max_score_items:
        raise RequestError(413, "body", f"{len(payload)} items; at most {limits.max_score_items} per request")
    items = []
    for index, record in enumerate(payload):
        where = f"[{index}]"
        if not isinstance(record, dict):
            raise RequestError(422, where, f"must be an object, got {_type_name(record)}")
        _no_unknown_keys(record, ("prompt", "response"), where)
        item = ScoreItem(_text(record, "prompt", where, limits), _text(record, "response", where, limits))
        if not (item.prompt + item.response).strip():
            # Some tokenizers give whitespace no tokens at all, and an RM cannot score an empty sequence.
            raise RequestError(422, where, "prompt and response are both empty")
        items.append(item)
    return items


def _integer(payload: dict, key: str, lo: int, hi: int) -> int:
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, key, f"must be an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise RequestError(413 if key == "max_tokens" and value > hi else 422, key,
                           f"must be between {lo} and {hi}, got {value}")
    return value


def _number(payload: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float:
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(422, key, f"must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise RequestError(422, key, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}")
    return float(value)


def parse_generate_request(payload: Any, limits: ServeLimitsConfig) -> GenerateParams:
    """{"prompt": str, "max_tokens": int, "temperature": float, "top_p": float, "n": int, "seed": int|null};
    all but the prompt are optional."""
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"must be an object with a prompt, got {_type_name(payload)}")
    _no_unknown_keys(payload, ("prompt", *GENERATE_DEFAULTS), "")
    prompt = _text(payload, "prompt", "", limits)
    if not prompt.strip():
        raise RequestError(422, "prompt", "empty")
    values = {**GENERATE_DEFAULTS, "max_tokens": min(GENERATE_DEFAULTS["max_tokens"], limits.max_tokens), **payload}
    payload = {key: values[key] for key in GENERATE_DEFAULTS}
    seed = None if payload["seed"] is None else _integer(payload, "seed", 0, MAX_SEED)
    params = GenerateParams(
        prompt=prompt,
        max_tokens=_integer(payload, "max_tokens", 1, limits.max_tokens),
        temperature=_number(payload, "temperature", 0.0, limits.max_temperature),
        top_p=_number(payload, "top_p", 0.0, 1.0, lo_open=True),
        n=_integer(payload, "n", 1, limits.max_n),
        seed=seed,
    )
    if params.temperature == 0 and params.n > 1:
        raise RequestError(422, "n", f"greedy decoding (temperature 0) has one answer; got n={params.n}")
    return params


def check_prompt_tokens(n_tokens: int, limits: ServeLimitsConfig) -> None:
    if n_tokens == 0:
        raise RequestError(422, "prompt", "has no tokens under the policy's tokenizer")
    if n_tokens > limits.max_prompt_tokens:
        raise RequestError(413, "prompt", f"{n_tokens} tokens; at most {limits.max_prompt_tokens}")
