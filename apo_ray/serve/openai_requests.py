"""What a client may send to the OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`), checked
before any replica sees it (pure: no Ray; the chat template needs only the policy's tokenizer).

Statuses as for /generate (apo_ray.serve.requests): 400 for the wrong shape or an unknown field, 413 over a
serve.limits size, 422 for a wrong type or value; an unknown model is a 404 with OpenAI's `model_not_found`.
As in OpenAI's API, a null optional field means its default. What passes is the keyword arguments of
ray.serve.llm's ChatCompletionRequest / CompletionRequest.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from apo_ray.config import ServeLimitsConfig
from apo_ray.serve.requests import (
    GENERATE_DEFAULTS,
    RequestError,
    check_prompt_tokens,
    no_unknown_keys,
    parse_sampling,
    text_field,
    type_name,
)

CHAT_ROLES = ("system", "user", "assistant")
# OpenAI's own limit on stop sequences.
MAX_STOP_SEQUENCES = 4
SAMPLING_FIELDS = (*GENERATE_DEFAULTS, "stream", "stop")


def _object(payload: Any, what: str) -> dict:
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"must be an object with {what}, got {type_name(payload)}")
    return {key: value for key, value in payload.items() if value is not None}


def _model(payload: dict, model_ids: Collection[str], limits: ServeLimitsConfig) -> str:
    model = text_field(payload, "model", "", limits)
    if model not in model_ids:
        raise RequestError(
            404,
            "model",
            f"no model {model!r} here; this server has {', '.join(sorted(model_ids))}",
            code="model_not_found",
        )
    return model


def _stop(payload: dict, limits: ServeLimitsConfig) -> list[str] | None:
    if "stop" not in payload:
        return None
    stop = payload["stop"]
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
        raise RequestError(422, "stop", f"must be a string or an array of strings, got {type_name(stop)}")
    if not 1 <= len(sequences) <= MAX_STOP_SEQUENCES:
        raise RequestError(422, "stop", f"{len(sequences)} sequences; 1 to {MAX_STOP_SEQUENCES}")
    for index, sequence in enumerate(sequences):
        field = "stop" if isinstance(stop, str) else f"stop[{index}]"
        if not sequence:
            raise RequestError(422, field, "empty string")
        if len(sequence) > limits.max_text_chars:
            raise RequestError(413, field, f"{len(sequence)} characters; at most {limits.max_text_chars}")
    return sequences


def _sampling(payload: dict, limits: ServeLimitsConfig) -> dict[str, Any]:
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, "stream", f"must be true or false, got {type_name(stream)}")
    # OpenAI's default is as many tokens as the context leaves; here that is serve.limits.max_tokens.
    sampling = parse_sampling(payload, limits, default_max_tokens=limits.max_tokens)
    return {**sampling, "stream": stream, "stop": _stop(payload, limits)}


def parse_chat_request(payload: Any, limits: ServeLimitsConfig, model_ids: Collection[str]) -> dict[str, Any]:
    """{"model", "messages": [{"role", "content"}, ...], sampling fields}; `max_completion_tokens`, OpenAI's
    newer name, is taken for max_tokens."""
    payload = _object(payload, "messages")
    no_unknown_keys(payload, ("model", "messages", "max_completion_tokens", *SAMPLING_FIELDS), "")
    model = _model(payload, model_ids, limits)
    renamed = "max_completion_tokens" in payload
    if renamed:
        if "max_tokens" in payload:
            raise RequestError(400, "max_completion_tokens", "give it or max_tokens, not both")
        payload["max_tokens"] = payload.pop("max_completion_tokens")
    try:
        sampling = _sampling(payload, limits)
    except RequestError as error:
        if renamed and error.field == "max_tokens":
            raise RequestError(error.status, "max_completion_tokens", error.message) from None
        raise
    return {"model": model, "messages": _messages(payload, limits), **sampling}


def _messages(payload: dict, limits: ServeLimitsConfig) -> list[dict[str, str]]:
    if "messages" not in payload:
        raise RequestError(422, "messages", "missing")
    messages = payload["messages"]
    if not isinstance(messages, list):
        raise RequestError(422, "messages", f"must be an array of {{role, content}} objects, got {type_name(messages)}")
    if not messages:
        raise RequestError(422, "messages", "empty array; send at least one {role, content}")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(422, where, f"must be an object, got {type_name(message)}")
        no_unknown_keys(message, ("role", "content"), where)
        role = text_field(message, "role", where, limits)
        if role not in CHAT_ROLES:
            raise RequestError(422, f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        # Only text: content parts (images, audio) are for models this server does not serve.
        checked.append({"role": role, "content": text_field(message, "content", where, limits)})
    return checked


def parse_completion_request(payload: Any, limits: ServeLimitsConfig, model_ids: Collection[str]) -> dict[str, Any]:
    """{"model", "prompt": str, sampling fields}: one prompt per request, text only."""
    payload = _object(payload, "a prompt")
    no_unknown_keys(payload, ("model", "prompt", *SAMPLING_FIELDS), "")
    model = _model(payload, model_ids, limits)
    prompt = text_field(payload, "prompt", "", limits)
    if not prompt.strip():
        raise RequestError(422, "prompt", "empty")
    return {"model": model, "prompt": prompt, **_sampling(payload, limits)}


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], limits: ServeLimitsConfig) -> list[int]:
    """The tokens the policy's own chat template makes of `messages`, ready for the assistant's turn; refused
    when the policy has no template or the prompt is over serve.limits.max_prompt_tokens."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        raise RequestError(
            400,
            "model",
            "the policy has no chat template (chat_template in its "
            "tokenizer_config.json or chat_template.jinja); POST /v1/completions "
            "takes a plain prompt",
        )
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    except TemplateError as exc:
        # Templates may refuse some conversations (a system turn not first, turns not alternating).
        raise RequestError(422, "messages", f"the policy's chat template refused them: {exc}") from None
    check_prompt_tokens(len(ids), limits, field="messages")
    return ids
