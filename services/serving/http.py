"""The OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as
server-sent events or not) and `GET /v1/models`, on the same engine as gRPC `Generate`.

The platform API key is the bearer token; a deployment's name is the model id; another tenant's
deployment is 404, as an unknown one. Errors have OpenAI's shape (`{"error": {"message", "type",
"param", "code"}}`) so its clients raise their own exception classes. A streamed request's
errors that come before its first token (unknown model, overload) are plain HTTP errors, not a
stream.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from llmstudio import errors
from llmstudio.auth import KeyDirectory, Principal
from llmstudio.config import Settings

from .engine import Chunk, Overloaded, SamplingParams
from .usecases import Prompt, Serving

# domain error -> (HTTP status, OpenAI error type)
HTTP_ERRORS: dict[type[errors.StudioError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.AlreadyExists: (409, "conflict_error"),
    errors.FailedPrecondition: (409, "conflict_error"),
    errors.ResourceExhausted: (429, "rate_limit_error"),
}


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind,
                                       "param": self.param, "code": self.code}}, self.status)


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, Overloaded):
        return ApiError(429, "rate_limit_error", str(e), code="overloaded")
    if isinstance(e, errors.StudioError):
        status, kind = next((HTTP_ERRORS[c] for c in type(e).__mro__ if c in HTTP_ERRORS),
                            (500, "server_error"))
        code = "model_not_found" if isinstance(e, errors.NotFound) else None
        return ApiError(status, kind, str(e), getattr(e, "field", None) or None, code)
    raise e


# -- requests (the fields this server honours; others are accepted and ignored) ----------------
class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def params(self, max_tokens: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        given = {name: value for name, value in (
            ("max_tokens", max_tokens or self.max_tokens), ("temperature", self.temperature),
            ("top_p", self.top_p)) if value is not None}  # unset: SamplingParams's defaults
        return SamplingParams(stop=tuple(stop), seed=self.seed, **given)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


# -- the app -------------------------------------------------------------------------------------
def build_app(serving: Serving, keys: KeyDirectory) -> FastAPI:
    app = FastAPI(title="LLM Studio OpenAI-compatible API", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return ApiError(400, "invalid_request_error",
                        f"{where}: {first.get('msg', 'invalid request')}", where or None
                        ).response()

    def caller(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        principal = keys.lookup(token)
        if principal is None:
            raise ApiError(401, "authentication_error",
                           "a valid LLM Studio API key is required as the bearer token",
                           code="invalid_api_key")
        if not principal.can("read"):
            raise ApiError(403, "permission_error",
                           f"key {principal.key_id} may not read (roles: "
                           f"{','.join(principal.roles)})")
        return principal

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        page = await serving.list(caller(request).tenant, 1000)
        return {"object": "list", "data": [
            {"id": s.deployment.name, "object": "model", "created": _epoch(s.deployment.created_at),
             "owned_by": s.deployment.tenant} for s in page]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        tenant = caller(request).tenant
        prompt = Prompt(messages=tuple({"role": m.role, "content": m.text()}
                                       for m in body.messages))
        params = body.params(body.max_completion_tokens)
        return await _respond(serving.generate(tenant, body.model, prompt, params), body,
                              _ChatFormat(body.model))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest,
                          request: Request) -> JSONResponse | StreamingResponse:
        tenant = caller(request).tenant
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise ApiError(400, "invalid_request_error", "one prompt per request", "prompt")
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        return await _respond(serving.generate(tenant, body.model, Prompt(text=text),
                                               body.params()), body,
                              _CompletionFormat(body.model))

    return app


class _ChatFormat:
    """How chat completions look, whole and in chunks."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict, version: int) -> dict:
        return {**self._head("chat.completion"), "system_fingerprint": f"v{version}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}], "usage": usage}

    def first(self, version: int) -> dict | None:
        return {**self._head("chat.completion.chunk"), "system_fingerprint": f"v{version}",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}]}

    def piece(self, text: str, finish: str | None, version: int) -> dict:
        delta = {"content": text} if text else {}
        return {**self._head("chat.completion.chunk"), "system_fingerprint": f"v{version}",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    def usage(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}


class _CompletionFormat:
    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model}

    def whole(self, text: str, finish: str, usage: dict, version: int) -> dict:
        return {**self._head(), "system_fingerprint": f"v{version}", "usage": usage,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    def first(self, version: int) -> dict | None:
        return None

    def piece(self, text: str, finish: str | None, version: int) -> dict:
        return {**self._head(), "system_fingerprint": f"v{version}",
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    def usage(self, usage: dict) -> dict:
        return {**self._head(), "choices": [], "usage": usage}


def _usage(last: Chunk) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _respond(chunks: AsyncIterator[tuple[Chunk, int]], body: _Sampling,
                   fmt: _ChatFormat | _CompletionFormat) -> JSONResponse | StreamingResponse:
    try:
        first = await anext(chunks)  # errors before the first token are the response's status
    except StopAsyncIteration:
        raise ApiError(500, "server_error", "the model produced nothing") from None
    except Exception as e:  # noqa: BLE001 - mapped, or raised again by _api_error
        await chunks.aclose()
        raise _api_error(e) from None
    if not body.stream:
        texts, (last, version) = [first[0].text], first  # one version serves a request
        async with contextlib.aclosing(chunks):
            async for last, _ in chunks:
                texts.append(last.text)
        return JSONResponse(fmt.whole("".join(texts), last.finish_reason or "stop",
                                      _usage(last), version))

    async def events() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            chunk, version = first
            if (opening := fmt.first(version)) is not None:
                yield _sse(opening)
            while True:
                yield _sse(fmt.piece(chunk.text, chunk.finish_reason, version))
                if chunk.finish_reason:
                    break
                try:
                    chunk, version = await anext(chunks)
                except StopAsyncIteration:
                    break
            if body.include_usage:
                yield _sse(fmt.usage(_usage(chunk)))
            yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _epoch(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's own loop: the service handles SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def http_server(app: FastAPI, settings: Settings) -> _EmbeddedServer:
    tls = {}
    if settings.tls_cert_file and settings.tls_key_file:
        tls = {"ssl_certfile": str(settings.tls_cert_file),
               "ssl_keyfile": str(settings.tls_key_file)}
    return _EmbeddedServer(uvicorn.Config(
        app, host=settings.grpc_host, port=settings.serving_http_port, log_level="warning",
        access_log=False, lifespan="off", **tls))
