"""The HTTP layer of the code-completion service, independent of the inference backend.

`create_app(backend_factory)` builds a FastAPI app around any `Backend` (our engine in
serve_api.py, vLLM later in serve_vllm.py):

    POST /complete          the chapter's small contract: {code, ...} -> {completion, tokens, latency_ms}
    POST /v1/completions    OpenAI completions (non-streaming and SSE), with fill-in-the-middle `suffix`
    GET  /v1/models         OpenAI model list
    GET  /health            liveness: 503 once the backend is dead
    GET  /ready             readiness: 503 until loaded and warmed, and from the start of shutdown
    GET  /stats             counters for humans;  GET /metrics: Prometheus text

Production behaviour lives here once for every backend: settings from the environment, bearer
keys compared in constant time, a per-key token bucket, bounded admission (429 + Retry-After,
never an unbounded wait), request timeouts (504), a 1 MB body cap (413), one OpenAI-shaped
error envelope, JSON logs with request ids, Prometheus metrics on a per-app registry, a
response cache for deterministic requests (in process or Redis), client-disconnect
cancellation and a SIGTERM drain (ready -> 503, in-flight requests finish, exit 0).
"""
from __future__ import annotations

import asyncio
import contextvars
import gc
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Literal, Protocol, Sequence, runtime_checkable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema,
                      field_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenizer import TokenizerLike

log = logging.getLogger("code_assistant.serving")
access_log = logging.getLogger("code_assistant.access")

MAX_BODY_BYTES = 1024 * 1024
# An over-long body is still read (and dropped) up to this size before the 413: a client that
# is still sending when the connection closes gets a reset instead of the answer.
DISCARD_BODY_BYTES = 8 * MAX_BODY_BYTES
MAX_PROMPT_CHARS = 500_000  # well under the body cap; the engine keeps only the text nearest the cursor
MAX_STOP_CHARS = 256
INLINE_TOKENIZE_CHARS = 2048  # prompts up to this long are tokenized on the event loop (~0.2 ms)
COMPLETE_MAX_TOKENS = 200
OPENAI_MAX_TOKENS = 2048
# Paths a load balancer or scraper polls: no key, never refused while draining.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
KNOWN_PATHS = frozenset({"/complete", "/v1/completions", "/v1/models", "/stats"}) | PUBLIC_PATHS
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


# =============================================================================
# settings

class SettingsError(ValueError):
    """A bad environment variable; the message names it and is safe to print as one line."""


class Settings(BaseSettings):
    """Every knob, from the environment (names are the upper-cased field names)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", protected_namespaces=())

    model_path: str = "out-code-assistant"
    model_name: str = Field("code-assistant", min_length=1, max_length=256)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_concurrent_sequences: int = Field(8, ge=1, le=4096)
    max_queue: int = Field(64, ge=0, le=1_000_000)
    # greedy decode steps per CUDA-graph launch while no request waits for a slot (engine.py's
    # decode_steps: faster decode, much slower warm-up)
    decode_steps: int = Field(1, ge=1, le=64)
    # decode launches an admitted prompt may wait so that several share a prefill while rows
    # decode (engine.py's prefill_wait_steps; 0: prefill at once). Unset: 4 on a GPU (on an
    # H100 it took 128 clients from 1167 to 1311 req/s, p95 133 -> 110 ms, side by side) and
    # 0 on a CPU, where a prefill's cost grows with its prompts and gathering them saves little.
    prefill_wait_steps: int | None = Field(None, ge=0, le=1024)
    max_prompt_tokens: int = Field(2048, ge=8)
    request_timeout_s: float = Field(60.0, gt=0, le=86400)
    api_keys: str = ""  # comma-separated; never logged
    api_keys_file: Path | None = None  # one key per line, '#' comments
    rate_limit_per_minute: int = Field(0, ge=0)  # per key; 0 is off
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str | None = None
    cache_size: int = Field(1024, ge=0)  # entries of the in-process cache; 0 disables caching
    cache_ttl_s: int = Field(86400, ge=1)  # Redis entries only
    drain_timeout_s: float = Field(30.0, ge=0, le=3600)
    # 1: the engine in its own process (serve_api.py's EngineProcessBackend), so HTTP work in
    # this process cannot starve it of the GIL; 0: on a thread of this process.
    engine_process: bool = True
    # N > 1 (serve_api.py only, needs ENGINE_PROCESS=1): N HTTP worker processes share the port and
    # one engine process; admission, rate limit and the in-process cache are split per worker.
    http_workers: int = Field(1, ge=1, le=64)
    # HTTP_WORKERS > 1: a worker that takes none of the engine's messages for this long is
    # disconnected (its requests fail, it restarts) so it cannot stall the others
    engine_unread_timeout_s: float = Field(30.0, gt=0, le=3600)
    # ---- set by serve_api.py's supervisor for its workers (HTTP_WORKERS > 1), never by hand: the
    # engine's Unix socket and the inherited listening socket's file descriptor.
    engine_socket: str = Field("", validation_alias="CODE_ASSISTANT_ENGINE_SOCKET")
    listen_fd: int = Field(-1, ge=-1, validation_alias="CODE_ASSISTANT_LISTEN_FD")
    # ---- FOR TESTS ONLY: fault injection and a slowed engine, used by tests/test_server*.py to
    # exercise error paths against a real server process. Never set these in production.
    fault_inject: Literal["", "off", "once", "always"] = Field("", validation_alias="CODE_ASSISTANT_FAULT_INJECT")
    test_step_delay_ms: float = Field(0.0, ge=0, le=10_000, validation_alias="CODE_ASSISTANT_TEST_STEP_DELAY_MS")

    @field_validator("log_level", "dtype", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("redis_url", "prefill_wait_steps", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    def api_key_hashes(self) -> list[bytes]:
        """SHA-256 digests of the configured keys (the keys themselves are not kept around)."""
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file is not None:
            text = self.api_keys_file.read_text(encoding="utf-8")
            keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        return [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]


def _env_name(field_name: str, settings_cls: type[Settings] = Settings) -> str:
    info = settings_cls.model_fields.get(field_name)
    alias = info.validation_alias if info is not None else None
    return alias if isinstance(alias, str) else field_name.upper()


def load_settings(settings_cls: type[Settings] = Settings, /, **overrides: Any) -> Settings:
    """Settings from the environment; SettingsError with a one-line message naming the variable.

    settings_cls: Settings or a subclass with a backend's own knobs (serve_vllm.VLLMSettings)."""
    try:
        settings = settings_cls(**overrides)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]  # values may be secrets: never echoed
        name = _env_name(str(err["loc"][0]), settings_cls) if err["loc"] else "settings"
        raise SettingsError(f"invalid environment variable {name}: {err['msg']}") from None
    if settings.http_workers > 1 and not settings.engine_process:
        raise SettingsError("invalid environment variable HTTP_WORKERS: more than 1 worker needs ENGINE_PROCESS=1 "
                            "(the workers share one engine process)")
    try:
        settings.api_key_hashes()
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"invalid environment variable API_KEYS_FILE: cannot read it ({type(e).__name__})") from None
    return settings


# =============================================================================
# logging: one JSON object per line

class JsonFormatter(logging.Formatter):
    _RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in self._RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["traceback"] = self.formatException(record.exc_info)  # server side only
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for our loggers and uvicorn's (whose access log we replace)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # our middleware writes one access line per request, with the request id and token counts
    logging.getLogger("uvicorn.access").disabled = True


# =============================================================================
# the backend contract

@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0  # 0 is off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GenerationTimings:
    """Seconds; None where the stage was never reached."""
    queue_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None


class Overloaded(RuntimeError):
    """The backend's queue is full: answer 429."""


class BackendUnavailable(RuntimeError):
    """The backend is dead or not loaded: answer 503."""


Tokenizer = TokenizerLike  # a backend's tokenizer: token ids <-> text, FIM control ids


@runtime_checkable
class Generation(Protocol):
    """One submitted request's token stream."""

    @property
    def finish_reason(self) -> str | None:  # stop | length | cancelled | error, once finished
        ...

    async def next_tokens(self) -> list[int] | None:
        """Every token generated since the last call (waits for at least one), or None once the
        request has finished. Batches keep per-token work off the event loop."""
        ...

    async def final_tokens(self) -> list[int] | None:
        """As next_tokens, but waits until the request has finished: every token not taken yet
        in one call (one wake-up per request instead of one per engine step), then None."""
        ...

    def cancel(self) -> None:
        """Drop the request at the backend's next step and free its slot (thread-safe, idempotent)."""
        ...

    def timings(self) -> GenerationTimings: ...


class TokenStream:
    """The token buffer of a Generation whose tokens arrive on the event loop itself (the
    engine-process reader, vLLM's output task): push() and end() never cross threads, so one
    asyncio.Event is all the signalling it needs."""

    __slots__ = ("_tokens", "_event", "_finished", "_wake_on_tokens", "finish_reason")

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._event = asyncio.Event()
        self._finished = False
        self._wake_on_tokens = True  # False while final_tokens waits: only the end wakes it
        self.finish_reason: str | None = None

    def push(self, tokens: list[int]) -> None:
        self._tokens.extend(tokens)
        if self._wake_on_tokens:
            self._event.set()

    def end(self, reason: str) -> None:
        self.finish_reason = reason
        self._finished = True
        self._event.set()

    async def next_tokens(self) -> list[int] | None:
        while True:
            if self._tokens:
                tokens, self._tokens = self._tokens, []
                return tokens
            if self._finished:
                return None
            self._event.clear()
            await self._event.wait()

    async def final_tokens(self) -> list[int] | None:
        self._wake_on_tokens = False
        while not self._finished:
            self._event.clear()
            await self._event.wait()
        tokens, self._tokens = self._tokens, []
        return tokens or None


@runtime_checkable
class Backend(Protocol):
    """What serving.py needs from an inference backend (engine, vLLM, ...)."""

    model_name: str  # the name clients see and send in `model`

    @property
    def model_id(self) -> str:  # identifies the exact weights: part of every cache key
        ...

    @property
    def device(self) -> str: ...

    @property
    def max_seq_len(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def healthy(self) -> bool:  # False once it failed beyond recovery (liveness)
        ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float: ...

    def memory_used_bytes(self) -> int: ...

    def engine_counters(self) -> dict[str, int] | None:
        """Cumulative engine work (engine.COUNTERS: decode_steps, decode_row_steps, prefills,
        prefill_rows), or None where the backend keeps no such counts."""
        ...

    def load(self) -> None:
        """Load the weights and warm up. Blocking; called once, on a worker thread."""
        ...

    def build_prompt(self, prefix: str, suffix: str | None, max_prompt_tokens: int) -> list[int]:
        """Prompt ids keeping the text nearest the cursor (end of prefix, start of suffix)."""
        ...

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> Generation:
        """Queue a request (call on the event loop). Raises Overloaded, BackendUnavailable, ValueError."""
        ...

    def shutdown(self) -> None:
        """Stop generating and release resources. Blocking; called on a worker thread."""
        ...


BackendFactory = Callable[[Settings], Backend]


# =============================================================================
# errors: one envelope, OpenAI's shape

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def elapsed_since(t0: float) -> float:
    """Seconds since perf_counter() read t0, never negative: some virtual machines' monotonic
    clock steps back by a millisecond or two between CPUs, and a latency must not."""
    return max(0.0, time.perf_counter() - t0)


async def _discard_body(receive: Callable, message: dict, size: int = 0) -> None:
    """Read the rest of a request body and drop it, up to DISCARD_BODY_BYTES in all."""
    while message.get("more_body", False) and size <= DISCARD_BODY_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))


def error_body(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.type, err.param, err.code),
                        status_code=err.status, headers=err.headers)


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 499: "client_closed_request", 503: "service_unavailable",
                 504: "timeout_error"}


def _param_of(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    if not parts:
        return "body"
    return ".".join(parts)


def _validation_message(err: dict) -> str:
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _internal_error(request_id: str | None) -> dict:
    return error_body(500, f"internal server error (request id {request_id})", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        err = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            return error_response(APIError(400, "request body is not valid JSON", param="body", code="invalid_json"))
        param = _param_of(err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}: this server does not accept it"
            code = "unknown_field"
        elif err.get("type") == "missing":
            msg = f"{param} is required"
            code = "missing_field"
        else:
            msg = f"{param}: {_validation_message(err)}"
            code = "invalid_value"
        return error_response(APIError(400, msg, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = {404: "not found", 405: "method not allowed"}.get(status, str(exc.detail) if status < 500 else "error")
        param = "body" if status == 400 else None
        return JSONResponse(error_body(status, message, _STATUS_TYPES.get(status, "server_error"), param),
                            status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(_internal_error(request_id_var.get()), status_code=500)


# =============================================================================
# request schemas

def _one_prompt(v: Any) -> Any:
    # The OpenAI API also takes a list of prompts or token arrays; we serve one string prompt.
    if isinstance(v, list):
        if len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if v and all(isinstance(x, int) or isinstance(x, list) for x in v):
            raise ValueError("token arrays are not supported: send the prompt as a string")
        raise ValueError("send one prompt: a string or a list of exactly one string")
    return v


def _stop_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
    {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
     "minItems": 1, "maxItems": 1}]}
_STOP_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
    {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}, "maxItems": 4},
    {"type": "null"}]}

PromptText = Annotated[str, BeforeValidator(_one_prompt), Field(min_length=1, max_length=MAX_PROMPT_CHARS),
                       WithJsonSchema(_PROMPT_SCHEMA)]
StopStrings = Annotated[
    Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=4)] | None,
    BeforeValidator(_stop_list), WithJsonSchema(_STOP_SCHEMA)]


def _integral(v: Any) -> Any:
    # JSON has one number type: 50.0 is an integer to JSON Schema (and to the OpenAI API); "50" is not
    return int(v) if type(v) is float and v.is_integer() else v


def bounded_int(ge: int, le: int) -> Any:
    # the bounds go on the inner int schema, so OpenAPI shows them as minimum/maximum
    return Annotated[Annotated[int, Field(ge=ge, le=le)], BeforeValidator(_integral)]


# bounds exactly representable as doubles, so every JSON client agrees where they are
Seed = bounded_int(-(2 ** 53 - 1), 2 ** 53 - 1) | None
CompleteMaxTokens = bounded_int(1, COMPLETE_MAX_TOKENS)
CompleteTopK = bounded_int(1, 1000)
OpenAIMaxTokens = bounded_int(1, OPENAI_MAX_TOKENS) | None
OpenAITopK = bounded_int(-1, 1000) | None
Suffix = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]


def _unsupported(what: str, allowed: Callable[[Any], bool], schema: dict) -> Any:
    """A field we accept only at its neutral value: anything else is a 400 naming it."""
    def check(v: Any) -> Any:
        if not allowed(v):
            raise ValueError(f"not supported by this server ({what})")
        return v
    return Annotated[Any, BeforeValidator(check), WithJsonSchema(schema)]


_ONE = {"anyOf": [{"type": "integer", "enum": [1]}, {"type": "null"}]}
_ZERO = {"anyOf": [{"type": "number", "enum": [0]}, {"type": "null"}]}


def _is_zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


OnlyOne = _unsupported("only n=1", lambda v: v in (None, 1) and type(v) is not bool, _ONE)
OnlyOneBestOf = _unsupported("only best_of=1", lambda v: v in (None, 1) and type(v) is not bool, _ONE)
NoEcho = _unsupported("only echo=false", lambda v: v is None or v is False,
                      {"anyOf": [{"type": "boolean", "enum": [False]}, {"type": "null"}]})
NoLogprobs = _unsupported("no logprobs", lambda v: v is None, {"type": "null"})
NoLogitBias = _unsupported("no logit_bias", lambda v: v is None or v == {},
                           {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]})
NoPresencePenalty = _unsupported("only 0", _is_zero, _ZERO)
NoFrequencyPenalty = _unsupported("only 0", _is_zero, _ZERO)


class CompleteRequest(BaseModel):
    """POST /complete: the chapter's contract."""
    model_config = ConfigDict(extra="forbid", strict=True)

    code: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] = Field(
        ..., description="the code before the cursor")
    max_tokens: CompleteMaxTokens = 50
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.2
    top_k: CompleteTopK = 50
    suffix: Suffix = Field(None, description="the code after the cursor (fill in the middle)")
    stop: StopStrings = None
    seed: Seed = None


class CompleteResponse(BaseModel):
    completion: str
    tokens: int
    latency_ms: float


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's completions API (one prompt, one choice)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: PromptText
    suffix: Suffix = None
    max_tokens: OpenAIMaxTokens = 16
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = 1.0
    top_k: OpenAITopK = None  # an extension (vLLM's): -1 or 0 is off
    stop: StopStrings = None
    seed: Seed = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Annotated[str | None, Field(max_length=256)] = None  # accepted, not used
    # accepted only at their neutral values, so nothing is silently ignored
    n: OnlyOne = None
    best_of: OnlyOneBestOf = None
    echo: NoEcho = None
    logprobs: NoLogprobs = None
    logit_bias: NoLogitBias = None
    presence_penalty: NoPresencePenalty = None
    frequency_penalty: NoFrequencyPenalty = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StatusResponse(BaseModel):
    status: str
    detail: str | None = None


class StatsResponse(BaseModel):
    """With HTTP_WORKERS > 1 the request, token and cache counts are this worker's (worker_pid);
    running, waiting and kv_cache_usage are the one engine's, for every worker alike."""
    model: str
    device: str
    uptime_s: float
    ready: bool
    requests: int
    errors: int
    requests_by_status: dict[str, int]
    mean_latency_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cache_hits: int
    cache_misses: int
    running: int
    waiting: int
    kv_cache_usage: float
    engine: dict[str, int] | None = Field(None, description=(
        "the engine's cumulative work since it started: decode_steps, decode_row_steps (rows x "
        "steps: their ratio is the mean decode batch), prefills, prefill_rows; null for vLLM"))
    worker_pid: int = Field(description="the HTTP process that answered")
    http_workers: int = Field(1, description="HTTP worker processes sharing the engine (HTTP_WORKERS)")


# =============================================================================
# post-processing: stop strings, suffix repetition, trailing spaces

class TextAssembler:
    """Turns generated token ids into completion text that can be streamed safely.

    `feed` returns the text that is final: it holds back what could still become a stop string,
    the current line while it could still repeat the suffix's first line, trailing spaces and
    an incomplete UTF-8 character. `finish` returns the rest. The deltas concatenate to the
    same text a non-streaming answer gets."""

    def __init__(self, decode: Callable[[list[int]], str], special_ids: Sequence[int] = (),
                 stop: Sequence[str] | None = None, suffix: str | None = None) -> None:
        self._decode = decode
        self._special = frozenset(special_ids)
        self._stop = [s for s in (stop or ()) if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._suffix_line = next((ln.strip() for ln in (suffix or "").splitlines() if ln.strip()), None)
        self._ids: list[int] = []
        self._text = ""
        self._checked = 0  # text before this index has been searched for stop strings
        self._emitted = 0
        self._cut: int | None = None
        self.stopped = False  # a stop string or the suffix repetition ended the completion

    def feed(self, token_ids: int | Sequence[int]) -> str:
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        new = [t for t in token_ids if t not in self._special]
        if self.stopped or not new:
            return ""
        self._ids.extend(new)
        text = self._decode(self._ids)
        self._text = text
        cut = self._find_stop(text)
        line_cut = self._find_suffix_repeat(text, complete_only=True)
        if line_cut is not None and (cut is None or line_cut < cut):
            cut = line_cut
        if cut is not None:
            self._cut = cut
            self.stopped = True
            return ""  # finish() hands out the rest
        self._checked = len(text)
        boundary = self._safe_boundary(text)
        if boundary <= self._emitted:
            return ""
        delta = text[self._emitted:boundary]
        self._emitted = boundary
        return delta

    def finish(self) -> str:
        text = self._text
        if self._cut is not None:
            text = text[: self._cut]
        else:
            line_cut = self._find_suffix_repeat(text, complete_only=False)
            if line_cut is not None:
                text = text[:line_cut]
        text = text.rstrip(" \t")
        delta = text[self._emitted:] if len(text) > self._emitted else ""
        self._emitted = max(self._emitted, len(text))
        self._final = text
        return delta

    @property
    def text(self) -> str:
        return getattr(self, "_final", self._text[: self._emitted])

    @property
    def can_stop(self) -> bool:
        """Whether a stop string or the suffix's first line may end the completion early."""
        return bool(self._stop) or bool(self._suffix_line)

    def _find_stop(self, text: str) -> int | None:
        best = None
        for s in self._stop:
            i = text.find(s, max(0, self._checked - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _find_suffix_repeat(self, text: str, complete_only: bool) -> int | None:
        """Start of the first line equal (ignoring surrounding whitespace) to the suffix's first line."""
        target = self._suffix_line
        if not target:
            return None
        start = 0
        while start <= len(text):
            end = text.find("\n", start)
            if end < 0:
                if not complete_only and text[start:].strip() == target:
                    return start
                return None
            if text[start:end].strip() == target:
                return start
            start = end + 1
        return None

    def _safe_boundary(self, text: str) -> int:
        end = len(text)
        # an incomplete UTF-8 sequence at the end decodes to one U+FFFD that may still become a
        # character; earlier replacement characters are final
        if end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        # a tail that is a prefix of a stop string may still become one
        for i in range(max(self._emitted, end - self._max_stop + 1), end):
            tail = text[i:end]
            if any(s.startswith(tail) for s in self._stop):
                end = i
                break
        # the current line may still turn out to repeat the suffix
        if self._suffix_line:
            line_start = text.rfind("\n", 0, end) + 1
            if self._suffix_line.startswith(text[line_start:end].strip()):
                end = line_start
        # last, since any cut above may end up being the end of the completion: trailing spaces
        return len(text[:end].rstrip(" \t"))


# =============================================================================
# cache

class ResponseCache(Protocol):
    async def get(self, key: str) -> dict | None: ...
    async def set(self, key: str, value: dict) -> None: ...
    async def close(self) -> None: ...


class MemoryCache:
    """A bounded LRU in this process."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, dict] = OrderedDict()

    async def get(self, key: str) -> dict | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: dict) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Shared between replicas. Failures degrade to misses: the cache must never fail a request."""

    PREFIX = "code-assistant:completion:"

    def __init__(self, url: str, ttl_s: int, on_error: Callable[[], None]) -> None:
        import redis.asyncio as aioredis  # imported here: only needed with REDIS_URL

        # short timeouts: a slow Redis must cost a cache miss, not a request timeout
        self._redis = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._ttl = ttl_s
        self._on_error = on_error
        self._errors = (OSError, aioredis.RedisError, asyncio.TimeoutError)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except self._errors as e:
            log.warning("redis cache unreachable at start: %s", type(e).__name__)
            return False

    async def get(self, key: str) -> dict | None:
        try:
            raw = await self._redis.get(self.PREFIX + key)
            return json.loads(raw) if raw is not None else None
        except (*self._errors, ValueError) as e:
            self._on_error()
            log.warning("redis cache get failed: %s", type(e).__name__)
            return None

    async def set(self, key: str, value: dict) -> None:
        try:
            await self._redis.set(self.PREFIX + key, json.dumps(value), ex=self._ttl)
        except self._errors as e:
            self._on_error()
            log.warning("redis cache set failed: %s", type(e).__name__)

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except self._errors:
            pass


# =============================================================================
# metrics

class Metrics:
    """Prometheus metrics on the app's own registry (two apps in one process never collide).

    multiprocess (serve_api.py with HTTP_WORKERS > 1): prometheus_client's multiprocess mode.
    Every worker writes its values under PROMETHEUS_MULTIPROC_DIR and /metrics on any worker
    reads all of them: counters and histograms are summed over workers (dead ones included, so
    totals never drop); active requests and the admission bound are summed over live workers;
    the engine's gauges come from the one engine, which every worker hears: the most recent
    value; model_loaded and code_completion_ready are the minimum over live workers (1 only
    while every worker is loaded / ready). Gauges read at scrape time (set_function) do not
    exist in that mode: `refresh()` sets them, on every engine stats message and every scrape."""

    def __init__(self, multiprocess: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess
        r: CollectorRegistry | None = self.registry
        if multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry)
            r = None  # the values live in the files; registered here too they would count twice
        self.refresh: Callable[[], None] = lambda: None
        latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("code_completion_requests", "HTTP requests by final status",
                                ["status", "endpoint"], registry=r)
        self.duration = Histogram("code_completion_duration_seconds", "request latency",
                                  ["endpoint"], buckets=latency, registry=r)
        self.active = Gauge("code_completion_active_requests", "completion requests being served", registry=r,
                            multiprocess_mode="livesum")
        self.tokens = Counter("code_completion_tokens_generated", "completion tokens generated", registry=r)
        self.prompt_tokens = Counter("code_completion_prompt_tokens", "prompt tokens processed", registry=r)
        self.queue_time = Histogram("code_completion_queue_time_seconds", "time from submit to scheduling",
                                    buckets=latency, registry=r)
        self.ttft = Histogram("code_completion_time_to_first_token_seconds", "time from submit to the first token",
                              buckets=latency, registry=r)
        self.tpot = Histogram("code_completion_time_per_output_token_seconds", "decode time per token after the first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.cache_hits = Counter("code_completion_cache_hits", "response cache hits", registry=r)
        self.cache_misses = Counter("code_completion_cache_misses", "response cache misses", registry=r)
        self.cache_errors = Counter("code_completion_cache_errors", "response cache backend errors", registry=r)
        self.running = Gauge("code_completion_requests_running", "sequences in the batch", registry=r,
                             multiprocess_mode="mostrecent")
        self.waiting = Gauge("code_completion_requests_waiting", "sequences waiting for a slot", registry=r,
                             multiprocess_mode="mostrecent")
        self.kv_usage = Gauge("code_completion_kv_cache_usage_ratio", "fraction of the KV cache in use", registry=r,
                              multiprocess_mode="mostrecent")
        self.gpu_memory = Gauge("gpu_memory_used_bytes", "accelerator memory allocated by the model", registry=r,
                                multiprocess_mode="mostrecent")
        self.model_loaded = Gauge("model_loaded", "1 once the model is loaded and warmed", registry=r,
                                  multiprocess_mode="livemin")
        # model_loaded stays 1 when the engine dies later; this one follows /ready itself
        self.ready = Gauge("code_completion_ready", "1 while /ready answers 200: loaded, healthy, not draining",
                           registry=r, multiprocess_mode="livemin")
        self.max_in_flight = Gauge("code_completion_max_in_flight_requests",
                                   "requests admitted at once before 429 server_overloaded", registry=r,
                                   multiprocess_mode="livesum")
        # a per-key rate limit and a full server both answer 429: the reason tells them apart
        self.rejections = Counter("code_completion_rejections", "429 answers by reason", ["reason"], registry=r)
        # a stream answered 200 before it failed: its error never shows in the status counts
        self.stream_errors = Counter("code_completion_stream_errors",
                                     "streams that ended in an error event after their 200 headers",
                                     ["code"], registry=r)
        # made now, so each is exported at 0 from the start (rate() sees the first 429), and kept:
        # 429s come in bursts under overload, where labels() per answer would add to the load
        self.rejected = {reason: self.rejections.labels(reason=reason)
                         for reason in ("rate_limit_exceeded", "server_overloaded", "queue_full")}
        if multiprocess:
            self.stream_errors.labels(code="timeout")  # a family with no sample at all is not exported there
        # labelled children, looked up once per label set: labels() costs more than the
        # observation itself, and runs twice per request
        self._requests_by: dict[tuple[int, str], Any] = {}
        self._duration_by: dict[str, Any] = {}

    def observe_request(self, status: int, endpoint: str, elapsed_s: float) -> None:
        """One finished HTTP request: its status count and its latency."""
        counter = self._requests_by.get((status, endpoint))
        if counter is None:
            counter = self._requests_by[(status, endpoint)] = self.requests.labels(status=str(status),
                                                                                   endpoint=endpoint)
        duration = self._duration_by.get(endpoint)
        if duration is None:
            duration = self._duration_by[endpoint] = self.duration.labels(endpoint=endpoint)
        counter.inc()
        duration.observe(elapsed_s)

    def bind(self, backend: Backend, state: "ServingState") -> None:
        # read at scrape time, so they are never stale
        def safe(fn: Callable[[], float]) -> Callable[[], float]:
            def read() -> float:
                if not state.loaded:
                    return 0.0
                try:
                    return float(fn())
                except (RuntimeError, AttributeError, ValueError):
                    return 0.0
            return read
        running, waiting = safe(lambda: backend.num_running), safe(lambda: backend.num_waiting)
        kv_usage, gpu_memory = safe(lambda: backend.kv_cache_usage), safe(backend.memory_used_bytes)
        loaded = lambda: 1.0 if state.loaded and not state.load_failed else 0.0  # noqa: E731
        ready = safe(lambda: 1.0 if state.ready else 0.0)
        self.max_in_flight.set(state.max_in_flight)
        # The engine's cumulative counts, read at scrape time. Not in the multiprocess files: they
        # are the one engine's, which every worker hears, so any worker's copy is the value.
        self.registry.register(EngineWorkCollector(backend, state))
        if not self.multiprocess:
            self.running.set_function(running)
            self.waiting.set_function(waiting)
            self.kv_usage.set_function(kv_usage)
            self.gpu_memory.set_function(gpu_memory)
            self.model_loaded.set_function(loaded)
            self.ready.set_function(ready)
            return

        def refresh() -> None:
            self.running.set(running())
            self.waiting.set(waiting())
            self.kv_usage.set(kv_usage())
            self.gpu_memory.set(gpu_memory())
            self.model_loaded.set(loaded())
            self.ready.set(ready())

        self.refresh = refresh
        if hasattr(backend, "on_stats"):  # a backend that hears the engine's stats says when they change
            backend.on_stats = refresh
        refresh()


# =============================================================================
# auth, rate limit, admission

class EngineWorkCollector:
    """code_completion_engine_*_total from Backend.engine_counters(): decode steps, rows x
    decode steps (their rates' ratio is the mean decode batch), prefills and prefill rows.
    The families are always exported, without samples for a backend that has no such counts
    (vLLM) or before the model is loaded: both backends list the same metric names."""

    HELP = {"decode_steps": "decode steps the engine ran",
            "decode_row_steps": "rows x decode steps (rate / decode_steps rate = mean decode batch)",
            "prefills": "prefill batches the engine ran", "prefill_rows": "prompt rows in those prefills"}

    def __init__(self, backend: Backend, state: "ServingState") -> None:
        self.backend, self.state = backend, state

    def collect(self) -> Iterator[CounterMetricFamily]:
        counters = self.backend.engine_counters() if self.state.loaded and not self.state.load_failed else None
        for key, text in self.HELP.items():
            family = CounterMetricFamily(f"code_completion_engine_{key}", text)
            if counters:
                family.add_metric([], counters.get(key, 0))
            yield family


class RateLimiter:
    """A token bucket per key: `per_minute` requests of burst, refilled continuously."""

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)

    def acquire(self, key: str) -> float:
        """0.0 if allowed, else the seconds until the next token."""
        if self.capacity <= 0:
            return 0.0
        now = time.monotonic()
        tokens, t = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - t) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:  # bounded memory when keyed by client address
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / self.rate


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    latency_sum_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass
class ServingState:
    """Everything a request handler needs, on app.state.serving."""
    settings: Settings
    backend: Backend
    metrics: Metrics
    cache: ResponseCache | None
    limiter: RateLimiter
    key_hashes: list[bytes]
    max_in_flight: int  # this process's share when several workers share the engine
    workers: int = 1
    started: float = field(default_factory=time.time)
    loaded: bool = False
    load_failed: bool = False
    draining: bool = False
    in_flight: int = 0
    active: set = field(default_factory=set)  # Generations being served, cancelled if a drain times out
    stats: Stats = field(default_factory=Stats)
    server: Any = None  # the uvicorn.Server, when found, to end it after draining

    @property
    def ready(self) -> bool:
        return self.loaded and not self.load_failed and not self.draining and self.backend.healthy


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


_bearer = HTTPBearer(auto_error=False, description="an API key from API_KEYS / API_KEYS_FILE")


async def require_key(request: Request,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's identity for rate limiting: a digest of its key, or its address when open."""
    state = get_state(request)
    if not state.key_hashes:
        return "addr:" + (request.client.host if request.client else "unknown")
    if credentials is None or not credentials.credentials:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    presented = hashlib.sha256(credentials.credentials.encode("utf-8")).digest()
    match = False
    for h in state.key_hashes:  # every hash, every time: timing says nothing about which matched
        match |= hmac.compare_digest(presented, h)
    if not match:
        raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return "key:" + presented.hex()[:16]


async def rate_limited(request: Request, principal: Annotated[str, Depends(require_key)]) -> str:
    state = get_state(request)
    wait = state.limiter.acquire(principal)
    if wait > 0:
        state.metrics.rejected["rate_limit_exceeded"].inc()
        raise APIError(429, "rate limit exceeded for this key", "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return principal


# =============================================================================
# the completion service

@dataclass
class Job:
    """A completion request, whichever endpoint it came through."""
    endpoint: str
    prompt: str
    suffix: str | None
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str]

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False


class Session:
    """One admitted generation: its admission slot, backend request and text assembly."""

    def __init__(self, state: ServingState, job: Job, gen: Generation, prompt_tokens: int, deadline: float) -> None:
        self.state = state
        self.job = job
        self.gen = gen
        self.prompt_tokens = prompt_tokens
        self.deadline = deadline
        self.completion_tokens = 0
        tok = state.backend.tokenizer
        specials = (tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id)
        self.assembler = TextAssembler(tok.decode, specials, job.stop, job.suffix)
        self.finish_reason: str | None = None
        self._closed = False

    async def deltas(self, whole: bool = False) -> AsyncIterator[str]:
        """Final text pieces; raises TimeoutError past the deadline, APIError if the backend failed.

        whole: the caller only wants the finished text. Unless a stop string or the suffix could
        end the completion early (which needs each step's tokens, to free the slot at once),
        the tokens are then taken in one go when the request finishes."""
        fetch = self.gen.next_tokens
        if whole and not self.assembler.can_stop:
            fetch = self.gen.final_tokens
        while True:
            if time.monotonic() >= self.deadline:
                raise TimeoutError
            # a timer, not wait_for's extra task: this runs once per batch of tokens
            async with asyncio.timeout(self.deadline - time.monotonic()):
                tokens = await fetch()
            if tokens is None:
                break
            self.completion_tokens += len(tokens)
            delta = self.assembler.feed(tokens)
            if delta:
                yield delta
            if self.assembler.stopped:
                self.gen.cancel()  # a stop string ended it: free the slot now
                self.finish_reason = "stop"
                break
        if self.finish_reason is None:
            reason = self.gen.finish_reason
            if reason == "error":
                log.error("generation failed in the backend")
                raise APIError(500, _internal_error(request_id_var.get())["error"]["message"], "server_error")
            if reason == "cancelled":
                raise APIError(503, "the server is shutting down", "service_unavailable",
                               headers={"Retry-After": "1"})
            self.finish_reason = "length" if reason == "length" else "stop"
        tail = self.assembler.finish()
        if tail:
            yield tail

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.gen.cancel()  # no-op when finished; frees the slot when the client left or timed out
        st = self.state
        st.active.discard(self.gen)
        st.in_flight -= 1
        st.metrics.active.dec()
        st.metrics.tokens.inc(self.completion_tokens)
        st.stats.completion_tokens += self.completion_tokens
        t = self.gen.timings()
        if t.queue_s is not None:
            st.metrics.queue_time.observe(t.queue_s)
        if t.ttft_s is not None:
            st.metrics.ttft.observe(t.ttft_s)
        if t.tpot_s is not None:
            st.metrics.tpot.observe(t.tpot_s)


class CompletionService:
    def __init__(self, state: ServingState) -> None:
        self.state = state

    def cache_key(self, job: Job, max_prompt_tokens: int) -> str | None:
        st = self.state
        if st.cache is None or not job.deterministic:
            return None
        greedy = job.temperature == 0
        fields = {
            "model": st.backend.model_id, "prompt": job.prompt, "suffix": job.suffix,
            "max_tokens": job.max_tokens, "max_prompt_tokens": max_prompt_tokens, "stop": job.stop,
            # greedy decoding ignores the sampling knobs: one entry serves them all
            "temperature": job.temperature, "top_k": None if greedy else job.top_k,
            "top_p": None if greedy else job.top_p, "seed": None if greedy else job.seed,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()

    def max_prompt_tokens(self, job: Job) -> int:
        seq = self.state.backend.max_seq_len
        floor = 4 if job.suffix is not None else 1  # a FIM prompt needs its three control tokens
        # keep room for max_tokens; if that leaves too little, generation stops at the context end
        return max(floor, min(self.state.settings.max_prompt_tokens, seq - job.max_tokens, seq - 1))

    def _check_available(self) -> None:
        st = self.state
        if st.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", headers={"Retry-After": "1"})
        if not st.loaded or st.load_failed:
            raise APIError(503, "the model is not loaded yet", "service_unavailable", headers={"Retry-After": "5"})
        if not st.backend.healthy:
            raise APIError(503, "the inference engine is not available", "service_unavailable")

    async def lookup(self, key: str | None) -> Result | None:
        st = self.state
        if key is None:
            return None
        hit = await st.cache.get(key)
        if hit is None:
            st.metrics.cache_misses.inc()
            st.stats.cache_misses += 1
            return None
        st.metrics.cache_hits.inc()
        st.stats.cache_hits += 1
        return Result(hit["text"], hit["finish_reason"], hit["prompt_tokens"], hit["completion_tokens"], cached=True)

    async def start(self, job: Job, max_prompt_tokens: int) -> Session:
        st = self.state
        self._check_available()
        if st.in_flight >= st.max_in_flight:
            st.metrics.rejected["server_overloaded"].inc()
            raise APIError(429, "the server is at capacity, retry shortly", "rate_limit_error",
                           code="server_overloaded", headers={"Retry-After": "1"})
        st.in_flight += 1
        st.metrics.active.inc()
        gen = None
        try:
            deadline = time.monotonic() + st.settings.request_timeout_s
            try:
                # tokenizing a long prompt is real CPU work: keep it off the event loop; a short
                # one takes less time than the hand-off to a thread
                if len(job.prompt) + len(job.suffix or "") <= INLINE_TOKENIZE_CHARS:
                    ids = st.backend.build_prompt(job.prompt, job.suffix, max_prompt_tokens)
                else:
                    ids = await asyncio.to_thread(st.backend.build_prompt, job.prompt, job.suffix,
                                                  max_prompt_tokens)
            except ValueError:
                raise APIError(400, "the prompt cannot be encoded within the context", param="prompt") from None
            tok = st.backend.tokenizer
            params = GenerationParams(
                max_tokens=job.max_tokens, temperature=job.temperature, top_k=max(0, job.top_k),
                top_p=job.top_p, seed=job.seed,
                stop_token_ids=(tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id))
            self._check_available()
            try:
                gen = st.backend.submit(ids, params)
            except Overloaded:
                st.metrics.rejected["queue_full"].inc()
                raise APIError(429, "the request queue is full, retry shortly", "rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
            except BackendUnavailable:
                raise APIError(503, "the inference engine is not available", "service_unavailable") from None
            except ValueError:
                raise APIError(400, "the prompt does not fit the model's context", param="prompt") from None
        except BaseException:
            st.in_flight -= 1
            st.metrics.active.dec()
            raise
        st.active.add(gen)
        st.metrics.prompt_tokens.inc(len(ids))
        st.stats.prompt_tokens += len(ids)
        return Session(st, job, gen, len(ids), deadline)

    async def complete(self, job: Job, request: Request) -> Result:
        """A whole completion; cancels the generation if the client leaves or the deadline passes."""
        mpt = self.max_prompt_tokens(job)
        key = self.cache_key(job, mpt)
        self._check_available()
        cached = await self.lookup(key)
        if cached is not None:
            return cached
        session = await self.start(job, mpt)
        try:
            collect = asyncio.ensure_future(self._collect(session))
            watch = asyncio.ensure_future(_wait_disconnect(request))
            try:
                done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
            if collect not in done:
                collect.cancel()
                raise APIError(499, "client closed the request", "client_closed_request")
            text = collect.result()
        except TimeoutError:
            raise APIError(504, f"the request took longer than {self.state.settings.request_timeout_s:g}s",
                           "timeout_error", code="timeout") from None
        finally:
            session.close()
        result = Result(text, session.finish_reason or "stop", session.prompt_tokens, session.completion_tokens)
        if key is not None:
            await self.state.cache.set(key, {"text": result.text, "finish_reason": result.finish_reason,
                                             "prompt_tokens": result.prompt_tokens,
                                             "completion_tokens": result.completion_tokens})
        return result

    @staticmethod
    async def _collect(session: Session) -> str:
        parts = [d async for d in session.deltas(whole=True)]
        return "".join(parts)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


# =============================================================================
# middleware: request id, body cap, drain gate, access log, request metrics, last-resort 500

class RequestContextMiddleware:
    def __init__(self, app: Any, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: ServingState = self.fastapi_app.state.serving
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        t0 = time.perf_counter()
        status_box = {"status": 500, "started": False}

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                status_box["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        async def respond(status: int, body: dict, extra: dict[str, str] | None = None) -> None:
            payload = json.dumps(body).encode("utf-8")
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            hdrs += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
            await send_wrapped({"type": "http.response.start", "status": status, "headers": hdrs})
            await send_wrapped({"type": "http.response.body", "body": payload})

        try:
            if state.draining and path not in PUBLIC_PATHS:
                await respond(503, error_body(503, "the server is shutting down", "service_unavailable"),
                              {"Retry-After": "1"})
                return
            body_receive = await self._read_body(scope, receive, headers, respond)
            if body_receive is None:
                return
            await self.app(scope, body_receive, send_wrapped)
        except Exception:  # last resort: never a traceback to the client
            log.error("unhandled error", exc_info=True)
            if not status_box["started"]:
                await respond(500, _internal_error(rid))
        finally:
            status = status_box["status"]
            elapsed = elapsed_since(t0)
            st = scope["state"]
            state.metrics.observe_request(status, endpoint, elapsed)
            if endpoint in ("/complete", "/v1/completions"):
                s = state.stats
                s.requests += 1
                s.errors += status >= 400
                s.by_status[str(status)] = s.by_status.get(str(status), 0) + 1
                s.latency_sum_s += elapsed
            if access_log.isEnabledFor(logging.INFO):  # LOG_LEVEL=warning: not even the fields
                extra = {"method": scope.get("method"), "path": path, "status": status,
                         "latency_ms": round(elapsed * 1000, 2)}
                for k in ("prompt_tokens", "completion_tokens", "cached", "finish_reason"):
                    if k in st:
                        extra[k] = st[k]
                access_log.info("request", extra=extra)
            request_id_var.reset(token)

    async def _read_body(self, scope: dict, receive: Callable, headers: dict[str, str],
                         respond: Callable) -> Callable | None:
        """The whole body, buffered up to MAX_BODY_BYTES (413 beyond), replayed to the app."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        too_big = error_body(413, f"request body exceeds {MAX_BODY_BYTES} bytes", "invalid_request_error", "body",
                             "body_too_large")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await respond(400, error_body(400, "invalid Content-Length", "invalid_request_error", "body"))
                return None
            if int(length) > MAX_BODY_BYTES:
                if int(length) <= DISCARD_BODY_BYTES:
                    await _discard_body(receive, {"more_body": True})
                await respond(413, too_big, {"Connection": "close"})
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:  # a chunked or lying client: count what actually arrives
                await _discard_body(receive, message, size)
                await respond(413, too_big, {"Connection": "close"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and "json" in headers.get("content-type", ""):
            bad = _non_utf8_field(body)
            if bad is not None:
                await respond(400, error_body(400, f"{bad}: the request body is not valid UTF-8",
                                              "invalid_request_error", bad, "invalid_encoding"))
                return None
        replayed = False

        async def body_receive() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnect notices, for cancellation

        return body_receive


def _non_utf8_field(body: bytes) -> str | None:
    """None if the body is UTF-8, else the JSON field that holds the bad bytes ("body" if unknown)."""
    try:
        body.decode("utf-8")
        return None
    except UnicodeDecodeError:
        pass
    try:
        data = json.loads(body.decode("utf-8", "surrogateescape"))
    except ValueError:
        return "body"

    def find(value: Any, path: str) -> str | None:
        if isinstance(value, str):
            return path if any("\udc80" <= ch <= "\udcff" for ch in value) else None
        if isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                hit = find(k, sub) or find(v, sub)
                if hit:
                    return hit
        if isinstance(value, list):
            for i, v in enumerate(value):
                hit = find(v, f"{path}.{i}" if path else str(i))
                if hit:
                    return hit
        return None

    return find(data, "") or "body"


# =============================================================================
# drain on SIGTERM

def _install_sigterm_drain(app: FastAPI, state: ServingState) -> None:
    """Make SIGTERM drain before uvicorn stops.

    uvicorn's own handler stops accepting connections at once (so /ready could never answer
    503) and re-raises the signal after shutdown (exit code 143). Ours flips `draining`, lets
    in-flight requests finish for up to DRAIN_TIMEOUT_S, then ends the server gracefully."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    server = getattr(previous, "__self__", None)  # uvicorn installs its bound Server.handle_exit
    if server is not None and hasattr(server, "should_exit"):
        state.server = server
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: Any) -> None:
        if state.draining and state.server is not None:
            state.server.force_exit = True  # a second SIGTERM: stop now
            state.server.should_exit = True
            return
        loop.call_soon_threadsafe(lambda: app.state.drain_task or _start_drain(app, state, previous))

    signal.signal(signal.SIGTERM, on_sigterm)


def _start_drain(app: FastAPI, state: ServingState, previous: Any) -> asyncio.Task:
    app.state.drain_task = asyncio.get_running_loop().create_task(_drain(state, previous))
    return app.state.drain_task


async def _drain(state: ServingState, previous: Any) -> None:
    state.draining = True
    state.metrics.refresh()
    timeout = state.settings.drain_timeout_s
    log.info("SIGTERM: draining", extra={"in_flight": state.in_flight, "drain_timeout_s": timeout})
    deadline = time.monotonic() + timeout
    while state.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.in_flight > 0:
        log.warning("drain timeout: cancelling requests still in flight", extra={"in_flight": state.in_flight})
        for gen in list(state.active):
            gen.cancel()
        end = time.monotonic() + 5.0
        while state.in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
    log.info("drained: shutting down")
    if state.server is not None:
        state.server.should_exit = True
    elif callable(previous):
        previous(signal.SIGTERM, None)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


# =============================================================================
# the app

_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in {
    400: "invalid request (the envelope's param names the field)", 401: "missing or invalid API key",
    404: "unknown model",
    413: "body over 1 MB", 429: "rate limit or queue full (see Retry-After)", 500: "internal error",
    503: "not ready, engine down, or shutting down", 504: "timed out"}.items()}
# One server-sent event (OpenAPI 3.1: the schema of a text/event-stream describes each event).
# `data` is a CompletionResponse chunk as JSON, an error envelope, or the final "[DONE]".
_SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
    "retry": {"type": "integer"}}}
_PUBLIC_ERRORS = {500: _ERRORS[500], 503: _ERRORS[503]}


def per_worker(total: int, workers: int) -> int:
    """One worker's share of a global budget: ceil(total / workers), so the shares add up to at
    least the total (never a worker with none) and at most total + workers - 1."""
    return -(-total // workers)


def create_app(backend_factory: BackendFactory, settings: Settings | None = None, *,
               setup_logging: bool = True, workers: int = 1) -> FastAPI:
    """The ASGI app around the backend `backend_factory(settings)` builds (not yet loaded).

    workers > 1: this app is one of that many HTTP processes in front of one engine
    (serve_api.py, HTTP_WORKERS): the admission bound (MAX_CONCURRENT_SEQUENCES + MAX_QUEUE)
    and the per-key rate limit are split evenly (per_worker), so 429s come at about the same
    totals, exactly only while clients spread evenly over the workers; the in-process response
    cache is per worker (REDIS_URL shares one); metrics use multiprocess mode when
    PROMETHEUS_MULTIPROC_DIR is set (see Metrics)."""
    settings = settings or load_settings()
    if setup_logging:
        configure_logging(settings.log_level)
    backend = backend_factory(settings)
    metrics = Metrics(multiprocess=workers > 1 and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")))
    cache: ResponseCache | None = None
    if settings.redis_url:
        cache = RedisCache(settings.redis_url, settings.cache_ttl_s, metrics.cache_errors.inc)
    elif settings.cache_size > 0:
        cache = MemoryCache(settings.cache_size)
    state = ServingState(settings=settings, backend=backend, metrics=metrics, cache=cache,
                         limiter=RateLimiter(per_worker(settings.rate_limit_per_minute, workers)),
                         key_hashes=settings.api_key_hashes(), workers=workers,
                         max_in_flight=per_worker(settings.max_concurrent_sequences + settings.max_queue, workers))
    metrics.bind(backend, state)
    service = CompletionService(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _install_sigterm_drain(app, state)
        if not state.key_hashes:
            log.warning("no API keys configured (API_KEYS / API_KEYS_FILE): the server is open to anyone "
                        "who can reach it; fine for local use only")
        if isinstance(cache, RedisCache):
            await cache.ping()
        load_task = asyncio.create_task(_load(app, state))
        try:
            yield
        finally:
            state.draining = True
            if not load_task.done():
                await asyncio.wait({load_task}, timeout=1.0)
            await asyncio.to_thread(backend.shutdown)
            if cache is not None:
                await cache.close()
            log.info("stopped")

    app = FastAPI(title="code-assistant", version="1.0",
                  description="Self-hosted code completion: an OpenAI-compatible completions API.",
                  lifespan=lifespan)
    app.state.serving = state
    app.state.drain_task = None
    app.add_middleware(RequestContextMiddleware, fastapi_app=app)
    install_error_handlers(app)

    protected = [Depends(require_key)]

    @app.get("/health", response_model=StatusResponse, responses=_PUBLIC_ERRORS, tags=["ops"])
    async def health(request: Request) -> JSONResponse:
        """Liveness: 200 while the process and the engine live."""
        st = get_state(request)
        if st.load_failed or (st.loaded and not st.backend.healthy):
            return JSONResponse(error_body(503, "the inference engine is dead", "service_unavailable"), 503)
        return JSONResponse({"status": "ok", "detail": None})

    @app.get("/ready", response_model=StatusResponse, responses=_PUBLIC_ERRORS, tags=["ops"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 once loaded and warmed; 503 before, when unhealthy, and while shutting down."""
        st = get_state(request)
        if st.ready:
            return JSONResponse({"status": "ready", "detail": None})
        why = ("shutting down" if st.draining else "loading" if not st.loaded
               else "load failed" if st.load_failed else "engine unhealthy")
        return JSONResponse(error_body(503, f"not ready: {why}", "service_unavailable"), 503,
                            headers={"Retry-After": "1"})

    @app.get("/metrics", response_class=PlainTextResponse, responses=_PUBLIC_ERRORS, tags=["ops"])
    async def prometheus(request: Request) -> PlainTextResponse:
        m = get_state(request).metrics
        m.refresh()  # multiprocess mode: this worker's gauges as of now (the others': their last stats)
        return PlainTextResponse(generate_latest(m.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", response_model=StatsResponse, dependencies=protected,
             responses={401: _ERRORS[401], 500: _ERRORS[500], 503: _ERRORS[503]}, tags=["ops"])
    async def stats(request: Request) -> StatsResponse:
        st = get_state(request)
        s = st.stats
        loaded = st.loaded and not st.load_failed
        return StatsResponse(
            model=st.backend.model_name, device=st.backend.device if loaded else "unknown",
            uptime_s=round(time.time() - st.started, 3), ready=st.ready, requests=s.requests, errors=s.errors,
            requests_by_status=dict(s.by_status),
            mean_latency_ms=round(s.latency_sum_s / s.requests * 1000, 3) if s.requests else None,
            prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
            cache_hits=s.cache_hits, cache_misses=s.cache_misses,
            running=st.backend.num_running if loaded else 0, waiting=st.backend.num_waiting if loaded else 0,
            kv_cache_usage=round(st.backend.kv_cache_usage, 6) if loaded else 0.0,
            engine=st.backend.engine_counters() if loaded else None,
            worker_pid=os.getpid(), http_workers=st.workers)

    @app.get("/v1/models", response_model=ModelList, dependencies=protected,
             responses={401: _ERRORS[401], 500: _ERRORS[500], 503: _ERRORS[503]}, tags=["openai"])
    async def models(request: Request) -> ModelList:
        st = get_state(request)
        seq = st.backend.max_seq_len if st.loaded and not st.load_failed else None
        return ModelList(data=[ModelCard(id=st.backend.model_name, created=int(st.started),
                                         owned_by="code-assistant", max_model_len=seq)])

    def _record(request: Request, result_or_session: Any) -> None:
        st = request.scope.setdefault("state", {})
        st["prompt_tokens"] = result_or_session.prompt_tokens
        st["completion_tokens"] = result_or_session.completion_tokens

    @app.post("/complete", response_model=CompleteResponse, responses={k: v for k, v in _ERRORS.items() if k != 404},
              tags=["completion"])
    async def complete(body: CompleteRequest, request: Request,
                       _: Annotated[str, Depends(rate_limited)]) -> CompleteResponse:
        """Complete `code` at the cursor (optionally filling in up to `suffix`)."""
        t0 = time.perf_counter()
        job = Job("/complete", body.code, body.suffix, body.max_tokens, body.temperature, body.top_k, 1.0,
                  body.seed, body.stop or [])
        result = await service.complete(job, request)
        _record(request, result)
        request.scope["state"]["cached"] = result.cached
        return CompleteResponse(completion=result.text, tokens=result.completion_tokens,
                                latency_ms=round(elapsed_since(t0) * 1000, 2))

    stream_doc = {200: {"description": "the completion; with stream=true, server-sent events ending in "
                                       "'data: [DONE]'",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}}}, **_ERRORS}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=stream_doc, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request,
                          _: Annotated[str, Depends(rate_limited)]) -> Any:
        """OpenAI completions. `suffix` fills in the middle; `stream` answers with server-sent events."""
        st = get_state(request)
        if body.model != st.backend.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; GET /v1/models lists the served model",
                           "not_found_error", param="model", code="model_not_found")
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
        job = Job("/v1/completions", body.prompt, body.suffix, body.max_tokens or 16,
                  1.0 if body.temperature is None else body.temperature, top_k,
                  1.0 if body.top_p is None else body.top_p, body.seed, body.stop or [])
        cid = "cmpl-" + uuid.uuid4().hex
        created = int(time.time())
        name = st.backend.model_name
        if not body.stream:
            result = await service.complete(job, request)
            _record(request, result)
            request.scope["state"]["cached"] = result.cached
            request.scope["state"]["finish_reason"] = result.finish_reason
            return CompletionResponse(
                id=cid, created=created, model=name,
                choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
                usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                            total_tokens=result.prompt_tokens + result.completion_tokens))
        # Submit before answering: queue-full, not-ready and bad prompts get their real status.
        session = await service.start(job, service.max_prompt_tokens(job))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rid = request_id_var.get()

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        async def events() -> AsyncIterator[bytes]:
            try:
                async for delta in session.deltas():
                    yield _sse(chunk(delta, None))
                yield _sse(chunk("", session.finish_reason))
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": name,
                                "choices": [], "usage": {"prompt_tokens": session.prompt_tokens,
                                                         "completion_tokens": session.completion_tokens,
                                                         "total_tokens": session.prompt_tokens + session.completion_tokens}})
            except TimeoutError:
                st.metrics.stream_errors.labels(code="timeout").inc()
                yield _sse(error_body(504, "the request timed out", "timeout_error", code="timeout"))
            except APIError as e:
                st.metrics.stream_errors.labels(code=str(e.status)).inc()
                body_ = _internal_error(rid) if e.status >= 500 and e.status != 503 else \
                    error_body(e.status, e.message, e.type, e.param, e.code)
                yield _sse(body_)
            finally:
                # also runs when the client disconnects (the task is cancelled): frees the slot
                session.close()
                _record(request, session)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def custom_openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        # validation errors answer 400 with the envelope, never FastAPI's 422
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        comps = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    return app


def run_server(app: FastAPI) -> None:
    """Serve `app` with uvicorn on HOST:PORT (what `python serve_*.py` does); exit 1 if loading failed.

    With CODE_ASSISTANT_LISTEN_FD set (an HTTP worker started by serve_api.py's supervisor) it
    accepts on that inherited listening socket instead, which every worker shares."""
    import socket

    import uvicorn

    state = app.state.serving
    s = state.settings
    # Keep-alive longer than a load balancer's usual 60 s idle timeout: with uvicorn's 5 s default
    # the server may close a pooled connection just as a client sends on it (a dropped request).
    config = uvicorn.Config(app, host=s.host, port=s.port, log_config=None, access_log=False,
                            timeout_keep_alive=75,
                            timeout_graceful_shutdown=max(5, int(s.drain_timeout_s)), lifespan="on")
    sockets = [socket.socket(fileno=s.listen_fd)] if s.listen_fd >= 0 else None
    uvicorn.Server(config).run(sockets=sockets)
    if state.load_failed:
        sys.exit(1)


async def _load(app: FastAPI, state: ServingState) -> None:
    t0 = time.perf_counter()
    try:
        await asyncio.to_thread(state.backend.load)
    except Exception as e:  # any load failure: report it in one line and stop the server
        state.load_failed = True
        state.metrics.refresh()
        log.error("cannot load the model: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        if state.server is not None:
            state.server.should_exit = True
        return
    # Backends that take their outputs on this event loop start listening now, not at their
    # first request: a shared engine sends every HTTP worker its stats, and a worker that never
    # read them would fill its socket.
    on_loaded = getattr(state.backend, "on_loaded", None)
    if on_loaded is not None:
        on_loaded()
    state.loaded = True
    state.metrics.refresh()
    # Everything built so far (app, routes, schemas, tokenizer) lives as long as the process:
    # out of the collector's sight, so the collections that requests trigger stay small.
    gc.collect()
    gc.freeze()
    log.info("model loaded and warmed", extra={"model": state.backend.model_name, "device": state.backend.device,
                                               "load_s": round(time.perf_counter() - t0, 3)})
