"""The HTTP front of `apo-ray serve`: authentication, size limits and request checks (apo_ray.serve.requests,
apo_ray.serve.openai_requests), so only well-formed work reaches the model replicas; every refusal is a 4xx
naming the field.

It is ray.serve.llm's OpenAI ingress (`OpenAiIngress`, the router of `build_openai_app`), routed through
`make_fastapi_ingress` with apo-ray's own routes and none of the stock app's middleware (which allows CORS
from any origin). The OpenAI routes check a request, then hand it to the stock handler: it forwards the request
to the policy's LLMServer, where vLLM applies the policy's chat template, and answers in OpenAI's shapes, SSE
included.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray.exceptions import RayActorError

# Not re-exported by ray.serve.llm: what build_openai_app itself uses for the model list and for the errors of
# its handlers (a request vLLM refuses, a timeout).
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException, to_model_metadata
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from apo_ray.config import ServeLimitsConfig
from apo_ray.serve.openai_requests import chat_prompt_ids, parse_chat_request, parse_completion_request
from apo_ray.serve.requests import (
    RequestError,
    check_prompt_tokens,
    parse_generate_request,
    parse_json,
    parse_score_request,
)


def token_digest(token: str | None) -> str | None:
    # The replicas keep a digest, not the token: deployment arguments live in Ray's control plane.
    return hashlib.sha256(token.encode()).hexdigest() if token else None


async def read_body(request: Request, limits: ServeLimitsConfig) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (a declared length is checked first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(413, "body", f"{declared} bytes; at most {limits.max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise RequestError(413, "body", f"more than {limits.max_body_bytes} bytes")
    return bytes(body)


def refusal(error: RequestError, openai: bool) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.retry_after_s is not None:
        # RFC 9110's delay-seconds: a whole number, rounded up so that a client never retries early.
        headers["Retry-After"] = str(math.ceil(error.retry_after_s))
    return JSONResponse(
        error.to_openai_json() if openai else error.to_json(), status_code=error.status, headers=headers or None
    )


# What a model deployment's handle raises when it cannot answer now but may on a retry: its queue is full
# (serve.<deployment>.max_queued_requests), it has no replica, or the replica running the request stopped
# (Serve starts another).
RETRYABLE = (BackPressureError, DeploymentUnavailableError, RayActorError)


def unavailable(error: Exception, deployment: str, retry_after_s: float) -> RequestError:
    if isinstance(error, BackPressureError):
        why = f"busy: {error.message}"
    elif isinstance(error, RayActorError):
        why = "the replica running this request stopped before answering; Serve is replacing it"
    else:
        why = f"no replica can take the request now ({type(error).__name__})"
    return RequestError(
        503,
        deployment,
        f"{why}; send it again after {math.ceil(retry_after_s)} s",
        code="unavailable",
        retry_after_s=retry_after_s,
    )


class Ingress(OpenAiIngress):
    def __init__(
        self,
        scorer: Any,
        policy: Any,
        *,
        policy_config: Any,
        limits: ServeLimitsConfig,
        token_sha256: str | None,
        retry_after_s: float,
    ):
        """policy_config: the policy LLMServer's LLMConfig, or None without a policy. retry_after_s: a 503's
        Retry-After when a model deployment cannot answer now (serve.retry_after_s)."""
        models = {policy_config.model_id: policy} if policy is not None else {}
        super().__init__(models, {model_id: to_model_metadata(model_id, policy_config) for model_id in models})
        self.scorer, self.policy = scorer, policy
        self.limits, self.token_sha256, self.retry_after_s = limits, token_sha256, retry_after_s
        if policy is not None:
            from apo_ray.modeling import eos_token_ids, load_tokenizer

            self.model_id = policy_config.model_id
            policy_dir = policy_config.model_loading_config.model_source
            self.tokenizer = load_tokenizer(policy_dir)
            self.eos_ids = sorted(eos_token_ids(policy_dir, self.tokenizer))

    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "score": self.scorer is not None, "generate": self.policy is not None}

    async def score_rm(self, request: Request) -> JSONResponse:
        return await self._answer(request, self.scorer, "score", self._score)

    async def generate(self, request: Request) -> JSONResponse:
        return await self._answer(request, self.policy, "generate", self._generate)

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except RequestError as error:
            return refusal(error, openai=True)
        return JSONResponse((await self.models()).model_dump())

    async def model_info(self, model: str, request: Request) -> Response:
        try:
            self._authorize(request)
            if model not in self._model_cards:
                raise RequestError(404, "model", f"no model {model!r} here", code="model_not_found")
        except RequestError as error:
            return refusal(error, openai=True)
        return JSONResponse(self._model_cards[model].model_dump())

    async def chat(self, request: Request) -> Response:
        return await self._answer_openai(request, self._chat_request, OpenAiIngress.chat)

    async def completions(self, request: Request) -> Response:
        return await self._answer_openai(request, self._completion_request, OpenAiIngress.completions)

    async def _answer(self, request: Request, deployment: Any, name: str, handler) -> JSONResponse:
        try:
            self._authorize(request)
            if deployment is None:
                raise RequestError(404, name, f"this deployment serves no {'RM' if name == 'score' else 'policy'}")
            payload = parse_json(await read_body(request, self.limits), self.limits)
            return JSONResponse(await handler(payload))
        except RequestError as error:
            return refusal(error, openai=False)
        except RETRYABLE as error:
            return refusal(
                unavailable(error, "reward" if name == "score" else "policy", self.retry_after_s), openai=False
            )

    async def _answer_openai(self, request: Request, parse: Callable[[Any], Any], stock_handler) -> Response:
        """Check the request, then let ray.serve.llm's handler run it (JSON, or SSE chunks ending in
        `data: [DONE]`)."""
        try:
            self._authorize(request)
            if self.policy is None:
                raise RequestError(404, "model", "this deployment serves no policy", code="model_not_found")
            payload = parse_json(await read_body(request, self.limits), self.limits)
            body = parse(payload)
        except RequestError as error:
            return refusal(error, openai=True)
        try:
            return await stock_handler(self, body, request)
        except RETRYABLE as error:
            return refusal(unavailable(error, "policy", self.retry_after_s), openai=True)
        except OpenAIHTTPException as exc:
            return JSONResponse(
                {"error": {"message": exc.message, "type": exc.type, "param": None, "code": None}},
                status_code=exc.status_code,
            )

    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()) or "", self.token_sha256):
            raise RequestError(401, "authorization", "missing or wrong bearer token", code="invalid_api_key")

    def _chat_request(self, payload: Any) -> ChatCompletionRequest:
        fields = parse_chat_request(payload, self.limits, self._model_cards)
        chat_prompt_ids(self.tokenizer, fields["messages"], self.limits)
        return ChatCompletionRequest(**fields, stop_token_ids=self.eos_ids)

    def _completion_request(self, payload: Any) -> CompletionRequest:
        fields = parse_completion_request(payload, self.limits, self._model_cards)
        # Token ids, not the text: the prompt the engine runs is the one counted against the limit (tokenized
        # as vLLM tokenizes a text prompt, special tokens included).
        prompt_ids = self.tokenizer(fields.pop("prompt"))["input_ids"]
        check_prompt_tokens(len(prompt_ids), self.limits)
        return CompletionRequest(**fields, prompt=prompt_ids, stop_token_ids=self.eos_ids)

    async def _score(self, payload: Any) -> dict[str, list]:
        items = parse_score_request(payload, self.limits)
        return await self.scorer.score.remote(items)

    async def _generate(self, payload: Any) -> dict[str, Any]:
        params = parse_generate_request(payload, self.limits)
        prompt_ids = self.tokenizer(params.prompt, add_special_tokens=False)["input_ids"]
        check_prompt_tokens(len(prompt_ids), self.limits)
        request = CompletionRequest(
            model=self.model_id,
            prompt=prompt_ids,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            n=params.n,
            seed=params.seed,
            stop_token_ids=self.eos_ids,
            return_token_ids=True,
        )
        stream = self.policy.options(stream=True).completions.remote(request, None)
        response = await stream.__anext__()
        if not hasattr(response, "choices"):
            # An ErrorResponse from vLLM: the checks above keep client mistakes from reaching it.
            error = getattr(response, "error", None)
            raise RequestError(502, "policy", getattr(error, "message", str(response)))
        return {
            "prompt_tokens": len(prompt_ids),
            "choices": [
                {
                    "text": self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                    "token_ids": list(c.token_ids),
                    "finish_reason": c.finish_reason,
                }
                for c in response.choices
            ],
        }


ROUTES = {
    "healthz": lambda app: app.get("/healthz"),
    "score_rm": lambda app: app.post("/score"),
    "generate": lambda app: app.post("/generate"),
    "list_models": lambda app: app.get("/v1/models"),
    "model_info": lambda app: app.get("/v1/models/{model:path}"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "completions": lambda app: app.post("/v1/completions"),
}

IngressDeployment = make_fastapi_ingress(
    Ingress, endpoint_map=ROUTES, app=FastAPI(title="apo-ray", openapi_url=None, docs_url=None, redoc_url=None)
)
