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
    def __init__(
        self, status: int, field: str, message: str, code: str | None = None, retry_after_s: float | None = None
    ):
        """retry_after_s: the request may be sent again after this many seconds (a 503's Retry-After)."""
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message, self.code = status, field, message, code
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": f"{self.field}: {self.message}"}}

    def to_openai_json(self) -> dict[str, Any]:
        """The error body of OpenAI's API, which its client libraries parse into their exceptions."""
        kind = (
            "authentication_error"
            if self.status == 401
            else "server_error"
            if self.status >= 500
            else "invalid_request_error"
        )
        return {
            "error": {"message": f"{self.field}: {self.message}", "type": kind, "param": self.field, "code": self.code}
        }


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


def type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)
    )


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


def text_field(record: dict, key: str, where: str, limits: ServeLimitsConfig) -> str:
    field = f"{where}.{key}" if where else key
    if key not in record:
        raise RequestError(422, field, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise RequestError(422, field, f"must be a string, got {type_name(value)}")
    if len(value) > limits.max_text_chars:
        raise RequestError(413, field, f"{len(value)} characters; at most {limits.max_text_chars}")
    return value


def no_unknown_keys(record: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        field = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RequestError(400, field, f"unknown field (expected {', '.join(allowed)})")


def parse_score_request(payload: Any, limits: ServeLimitsConfig) -> list[ScoreItem]:
    """A JSON array of {"prompt": str, "response": str}, 1 to limits.max_score_items of them."""
    if not isinstance(payload, list):
        raise RequestError(400, "body", f"must be an array of {{prompt, response}} objects, got {type_name(payload)}")
    if not payload:
        raise RequestError(422, "body", "empty array; send at least one {prompt, response}")
    if len(payload) > limits.max_score_items:
        raise RequestError(413, "body", f"{len(payload)} items; at most {limits.max_score_items} per request")
    items = []
    for index, record in enumerate(payload):
        where = f"[{index}]"
        if not isinstance(record, dict):
            raise RequestError(422, where, f"must be an object, got {type_name(record)}")
        no_unknown_keys(record, ("prompt", "response"), where)
        item = ScoreItem(text_field(record, "prompt", where, limits), text_field(record, "response", where, limits))
        if not (item.prompt + item.response).strip():
            # Some tokenizers give whitespace no tokens at all, and an RM cannot score an empty sequence.
            raise RequestError(422, where, "prompt and response are both empty")
        items.append(item)
    return items


def integer_field(payload: dict, key: str, lo: int, hi: int, over_status: int = 422) -> int:
    """over_status: the status of a value above `hi` (413 where `hi` is a serve.limits size)."""
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, key, f"must be an integer, got {type_name(value)}")
    if not lo <= value <= hi:
        raise RequestError(over_status if value > hi else 422, key, f"must be between {lo} and {hi}, got {value}")
    return value


def number_field(payload: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float:
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(422, key, f"must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise RequestError(422, key, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}")
    return float(value)


def parse_sampling(payload: dict, limits: ServeLimitsConfig, default_max_tokens: int) -> dict[str, Any]:
    """max_tokens, temperature, top_p, n and seed of a request, defaults filled in; the /generate and OpenAI
    routes sample alike."""
    values = {**GENERATE_DEFAULTS, "max_tokens": default_max_tokens, **payload}
    values = {key: values[key] for key in GENERATE_DEFAULTS}
    sampling = {
        "max_tokens": integer_field(values, "max_tokens", 1, limits.max_tokens, over_status=413),
        "temperature": number_field(values, "temperature", 0.0, limits.max_temperature),
        "top_p": number_field(values, "top_p", 0.0, 1.0, lo_open=True),
        "n": integer_field(values, "n", 1, limits.max_n),
        "seed": None if values["seed"] is None else integer_field(values, "seed", 0, MAX_SEED),
    }
    if sampling["temperature"] == 0 and sampling["n"] > 1:
        raise RequestError(422, "n", f"greedy decoding (temperature 0) has one answer; got n={sampling['n']}")
    return sampling


def parse_generate_request(payload: Any, limits: ServeLimitsConfig) -> GenerateParams:
    """{"prompt": str, "max_tokens": int, "temperature": float, "top_p": float, "n": int, "seed": int|null};
    all but the prompt are optional."""
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"must be an object with a prompt, got {type_name(payload)}")
    no_unknown_keys(payload, ("prompt", *GENERATE_DEFAULTS), "")
    prompt = text_field(payload, "prompt", "", limits)
    if not prompt.strip():
        raise RequestError(422, "prompt", "empty")
    return GenerateParams(
        prompt=prompt,
        **parse_sampling(payload, limits, default_max_tokens=min(GENERATE_DEFAULTS["max_tokens"], limits.max_tokens)),
    )


def check_prompt_tokens(n_tokens: int, limits: ServeLimitsConfig, field: str = "prompt") -> None:
    if n_tokens == 0:
        raise RequestError(422, field, "has no tokens under the policy's tokenizer")
    if n_tokens > limits.max_prompt_tokens:
        raise RequestError(413, field, f"{n_tokens} tokens; at most {limits.max_prompt_tokens}")
