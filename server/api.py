"""The OpenAI-compatible HTTP API: `build_app(async_engine, settings) -> FastAPI`.

Routes: /v1/completions, /v1/chat/completions (JSON or SSE via sse-starlette), /v1/models,
/v1/models/{id}, /health, /metrics (Prometheus), /tokenize, /detokenize, /version. One HTTP
request fans out into prompts x n engine requests (choice index = prompt index * n + sample
index). Every error leaves as `{"error": {message, type, param, code}}` with an honest status:
400 for invalid input (never FastAPI's 422), 401, 404, 413, 429 + Retry-After, 503, 500
without a stack trace. Errors that happen after a stream has started go out as a
`data: {"error": ...}` event, then `data: [DONE]`. A client that disconnects aborts its engine
requests at once (the disconnect is watched while waiting too, not only while streaming).
This module knows HTTP; the wire format's shapes live in server/protocol.py and
server/openai_format.py, the fan-out in server/fanout.py. It knows nothing about batching,
caches or the model beyond the engine interface (docs/ENGINE.md). server/cli.py calls it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.drain import AFTER_ABORT_S, Drain, DrainGate
from server.engine import EngineDeadError, QueueFullError, RequestTooLongError
from server.fanout import Fanout
from server.metrics import ServerMetrics
from server.openai_format import (
    ChoiceState,
    GenerationFailed,
    Submission,
    chat_chunks,
    completion_chunks,
)
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenText,
    error_body,
    random_id,
)

logger = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/version", "/docs", "/openapi.json"})


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side settings; the engine's own live in EngineConfig."""

    served_model_name: str = field(default="fanformer", metadata={
        "help": "the model id clients send and /v1/models lists"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer <key>' on everything but /health, /metrics, "
                "/version"})
    cors_origins: tuple[str, ...] = field(default=(), metadata={
        "help": "origins allowed by CORS (none by default; '*' for any)"})
    max_request_bytes: int = field(default=4 * 1024 * 1024, metadata={
        "help": "larger request bodies are refused with 413"})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "on SIGTERM, seconds running requests get to finish"})
    retry_after_s: int = field(default=1, metadata={"help": "Retry-After sent with a 429"})


class APIError(Exception):
    """An error with its HTTP status and OpenAI body; raised anywhere, rendered once."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), \
            headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    pass


def engine_error(exc: Exception, param: str, retry_after_s: int = 1) -> APIError:
    """The engine's refusals as HTTP errors (429, 400, 503); anything else is a 500."""
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is busy ({exc}); retry later", "requests", None,
                        "rate_limit_exceeded", {"Retry-After": str(retry_after_s)})
    if isinstance(exc, RequestTooLongError):
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, GenerationFailed):
        if exc.reason == "abort":
            return APIError(503, str(exc), "server_error", None, "aborted")
        return APIError(500, str(exc), "server_error", None, None, {"x-should-retry": "false"})
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine has stopped; the server must be restarted",
                        "server_error", None, "engine_dead", {"x-should-retry": "false"})
    logger.error("request failed", exc_info=exc)
    return APIError(500, "internal server error", "server_error", None, None,
                    {"x-should-retry": "false"})


class _Guard:
    """Pure ASGI middleware: the API key (401) and the body size limit (413). Pure ASGI, not
    BaseHTTPMiddleware, so that streaming and disconnect detection pass through untouched."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["method"] != "OPTIONS" \
                and scope["path"] not in PUBLIC_PATHS \
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await APIError(401, "Incorrect API key provided.", param=None,
                                  code="invalid_api_key").response()(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():  # the server holds the body to it
            if int(length) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            return await self.app(scope, receive, send)
        # No (valid) length, e.g. a chunked body: read it here, up to the limit, then replay
        # it. Raising from inside the app's receive would surface as FastAPI's generic 400.
        chunks, seen, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body: nobody to answer
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._too_large()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return APIError(413, f"the request body exceeds {self.max_bytes} bytes",
                        code="request_too_large").response()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it and raise _ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work in done:
        return work.result()
    raise _ClientGone


def build_app(async_engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around a (not yet started) AsyncEngine; its lifespan starts and stops
    the engine."""
    settings = settings or ServerSettings()
    engine = async_engine
    tokenizer = engine.tokenizer
    vocab_size = engine.model_config.vocab_size
    max_model_len = engine.engine_config.max_model_len or engine.model_config.max_seq_len
    metrics = ServerMetrics(settings.served_model_name)
    token_text = TokenText(tokenizer)
    started_at = int(time.time())
    try:
        server_version = version("fanformer")
    except PackageNotFoundError:  # running from a source tree that is not installed
        server_version = "0+unknown"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.is_running:
            await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="fanformer-serve", version=server_version, lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif first.get("type") == "missing":
            message = f"{'.'.join(loc)} is required"
        else:
            message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
            message = f"{'.'.join(loc)}: {message}" if loc else message
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return APIError(500, "internal server error", "server_error",
                        headers={"x-should-retry": "false"}).response()

    # ---------------------------------------------------------------- helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != settings.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    def encode_text(text: str, param: str) -> list[int]:
        """The tokenizer refuses strings that are not valid Unicode (JSON allows lone
        surrogates such as "\\ud800"): a 400, not the tokenizer's TypeError as a 500."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param} is not valid UTF-8 (it holds a lone surrogate)",
                           param=param) from None
        return tokenizer.encode(text)

    def encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = encode_text(prompt, "prompt")
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            return ids
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab_size})",
                           param="prompt")
        return list(prompt)

    def truncated(body, ids: list[int]) -> list[int]:
        try:
            return body.truncate(ids, max_model_len)
        except ValueError as e:
            raise APIError(400, str(e), param="truncate_prompt_tokens") from None

    def sampling_params(make):
        """`make()` -> SamplingParams, checked; its ValueError is a 400 naming the field."""
        try:
            params = make()
            params.validate(vocab_size)
            return params
        except ValueError as e:  # "top_p must be in (0, 1], got 1.5": the field comes first
            field_name = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=field_name if field_name.isidentifier()
                           else None) from None

    def submissions(prompts_ids: list[list[int]], params, prefix: str) -> list[Submission]:
        subs = []
        for p, ids in enumerate(prompts_ids):
            for k in range(params.n):
                seed = None if params.seed is None else params.seed + k
                one = dataclasses.replace(params, n=1, seed=seed)
                subs.append(Submission(len(subs), p, ids, one, f"{prefix}-{len(subs)}"))
        return subs

    async def run(request: Request, subs: list[Submission], param: str, arrival: float,
                  stream_body=None, collect=None):
        """Submit, wait for the first outputs (client disconnects watched), then either stream
        (`stream_body(fan)` -> SSE events) or collect (`collect(fan)` -> a JSON body)."""
        fan = Fanout(engine, subs, metrics, arrival)
        try:
            await _unless_disconnected(request, fan.start())
        except _ClientGone:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - mapped to an HTTP status
            raise engine_error(e, param, settings.retry_after_s) from None
        if stream_body is not None:
            return EventSourceResponse(
                _sse(fan, stream_body), sep="\n",
                shutdown_grace_period=AFTER_ABORT_S)
        try:
            result = await _unless_disconnected(request, collect(fan))
        except _ClientGone:
            return Response(status_code=499)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to an HTTP status
            raise engine_error(e, param, settings.retry_after_s) from None
        finally:
            fan.close()
        return Response(result.model_dump_json(), media_type="application/json")

    async def _sse(fan: Fanout, body) -> AsyncIterator[bytes]:
        """SSE events, framed here (`data: ...\n\n`): sse-starlette sends bytes as they are,
        which spares it building an event object per token."""
        try:
            async for data in body(fan):
                yield b"data: " + data.encode() + b"\n\n"
        except Exception as e:  # noqa: BLE001 - after the 200, errors are events
            err = e if isinstance(e, APIError) else engine_error(e, "prompt")
            yield b"data: " + json.dumps(err.body).encode() + b"\n\n"
        finally:
            fan.close()
        yield b"data: [DONE]\n\n"

    # ---------------------------------------------------------------- generation routes
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        check_model(body.model)
        prompts = body.prompts()
        prompts_ids = [truncated(body, encode_prompt(p)) for p in prompts]
        if body.truncate_prompt_tokens is not None:  # echo what the model was given
            prompts = prompts_ids
        prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) if body.echo else ""
                        for p in prompts]
        rid = random_id("cmpl")
        model = settings.served_model_name
        states = [ChoiceState(i * body.n + k, prompt_texts[i] if body.echo else "", ids)
                  for i, ids in enumerate(prompts_ids) for k in range(body.n)]
        if body.max_tokens == 0 and not body.wants_prompt_logprobs:  # echo only: no engine
            result = completion_chunks.echo_only(rid, model, states, body.stream,
                                                 body.include_usage, EventSourceResponse)
            return result if body.stream else Response(result.model_dump_json(),
                                                       media_type="application/json")
        params = sampling_params(body.to_sampling_params)
        subs = submissions(prompts_ids, params, rid)
        fmt = completion_chunks(rid, model, states, token_text, logprobs=body.logprobs,
                                echo=body.echo, include_usage=body.include_usage,
                                num_prompts=len(prompts_ids))
        if body.stream:
            return await run(request, subs, "prompt", arrival, stream_body=fmt.stream)
        return await run(request, subs, "prompt", arrival, collect=fmt.collect)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        check_model(body.model)
        text = tokenizer.apply_chat_template(body.message_dicts(), body.add_generation_prompt)
        prompt_ids = truncated(body, encode_text(text, "messages"))
        room = max_model_len - len(prompt_ids)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {max_model_len} "
                                f"tokens. However, your messages resulted in {len(prompt_ids)} "
                                "tokens.", param="messages", code="context_length_exceeded")
        params = sampling_params(lambda: body.to_sampling_params(
            room, stop_token_ids=[tokenizer.im_end_id]))
        rid = random_id("chatcmpl")
        subs = submissions([prompt_ids], params, rid)
        states = [ChoiceState(k, "", prompt_ids) for k in range(body.n)]
        fmt = chat_chunks(rid, settings.served_model_name, states, token_text,
                          logprobs=params.logprobs, include_usage=body.include_usage)
        if body.stream:
            return await run(request, subs, "messages", arrival, stream_body=fmt.stream)
        return await run(request, subs, "messages", arrival, collect=fmt.collect)

    # ---------------------------------------------------------------- other routes
    def model_card() -> ModelCard:
        return ModelCard(id=settings.served_model_name, created=started_at,
                         max_model_len=max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        if engine.is_dead:
            raise APIError(503, "the engine has stopped", "server_error", code="engine_dead")
        if not engine.is_running:
            raise APIError(503, "the model is loading", "server_error", code="not_ready")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        if engine.is_running:
            metrics.update_from(engine.stats())
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        if body.messages is not None:
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content or ""} for m in body.messages],
                body.add_generation_prompt)
        else:
            text = body.prompt
        ids = encode_text(text, "messages" if body.messages is not None else "prompt")
        return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        encode_prompt(body.tokens)  # range check
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    @app.get("/version")
    async def get_version():
        return {"version": server_version}

    # innermost first: the drain gate counts what the key and size checks let through
    app.state.drain = Drain(settings.shutdown_timeout, engine.shutdown, settings.retry_after_s)
    app.add_middleware(DrainGate, drain=app.state.drain)
    app.add_middleware(_Guard, api_key=settings.api_key, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:  # outermost, so preflights and 401s carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app
