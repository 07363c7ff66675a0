"""The aiohttp app: OpenAI routes, admission (backpressure, draining), health and metrics.

``build_app(engine, settings)`` only builds the app; ``serve.py`` runs it next to the engine.
``build_app(None, settings)`` serves 503 "loading" until ``attach_engine``. Handlers raise
``ApiError`` for anything a client did wrong; ``middleware.py`` renders it, logs and measures.
Nothing heavy runs on the event loop: prompts are tokenized and chat-templated in a small thread
pool (the tokenizer releases the GIL), after the cheap length checks. A client that stops
reading a stream for ``write_timeout`` seconds is cut off and its requests aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import TypeVar

import msgspec
import structlog
from aiohttp import web

from conveyor.runtime.disagg.decode import FAILURE
from conveyor.runtime.engine.client import EngineClient, EngineDeadError
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.runtime.server.disagg_routes import Rooms, add_prefill_routes, bind_rooms, refuse_generate, unbind_rooms
from conveyor.runtime.server.endpoints import add_routes
from conveyor.runtime.server.errors import ApiError, bad_request, from_validation_error
from conveyor.runtime.server.fields import check_unknown_fields
from conveyor.runtime.server.inputs import Plan, chat_plan, completion_plan
from conveyor.runtime.server.metrics import CONTENT_TYPE, PREFIXES, EngineMetrics, HttpMetrics
from conveyor.runtime.server.middleware import middlewares, on_response_prepare
from conveyor.runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from conveyor.runtime.server.render import SSE_DONE, ChatRenderer, CompletionRenderer, Renderer, sse
from conveyor.runtime.server.stats_log import StatsLogger
from conveyor.runtime.server.streams import InFlight, run_choices, watch_engine

log = structlog.get_logger("conveyor.server")

Body = TypeVar("Body", CompletionRequest, ChatCompletionRequest)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting_requests: int = 1024  # queue bound for backpressure (429 past it)
    max_request_body: int = 4 << 20  # bytes; a 128k-token prompt as JSON ids is under 1 MiB
    shutdown_timeout: float = 30.0  # seconds running requests get to finish before they are aborted
    retry_after_s: int = 1
    ignore_unknown_fields: bool = False  # True: accept unknown request fields and log them (vLLM); else 400
    chat_template: str | None = None  # --chat-template: a Jinja template (text) replacing the model's
    tool_call_parser: str = "hermes"  # --tool-call-parser: how tool calls are read from the output
    # A connection must send a full request within this long of opening or of its last response
    # (aiohttp's keep-alive timer also runs from connection_made): slow-header clients are closed.
    keepalive_timeout: float = 15.0
    body_timeout: float = 30.0  # seconds to receive a request's body once its headers are in
    write_timeout: float = 30.0  # a stream whose client reads nothing for this long is aborted
    stall_timeout: float = 60.0  # /health says 503 after this long without engine progress while work waits
    input_workers: int = 2  # threads that tokenize and template prompts
    api_key: str | None = None  # None: no auth; else every path but open_paths wants "Bearer <key>"
    open_paths: tuple[str, ...] = ("/health", "/metrics")  # answered without the key
    allowed_origins: tuple[str, ...] = ()  # CORS: origins a browser may call from; "*" for any
    metrics_prefix: str = "conveyor"  # "vllm": vLLM's names for the series both engines have
    stats_interval_s: float = 10.0  # the periodic engine-stats log line; 0: off

    def __post_init__(self) -> None:
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be >= 1")
        if self.max_request_body < 1:
            raise ValueError("max_request_body must be >= 1")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        for name in ("keepalive_timeout", "body_timeout", "write_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.input_workers < 1:
            raise ValueError("input_workers must be >= 1")
        if self.metrics_prefix not in PREFIXES:
            raise ValueError(f"metrics_prefix must be one of {', '.join(PREFIXES)}, got {self.metrics_prefix!r}")
        if self.stats_interval_s < 0:
            raise ValueError("stats_interval_s must be >= 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")


class ServerState:
    """What the handlers share: the engine, settings, metrics and the in-flight record."""

    def __init__(self, engine: EngineClient | None, settings: ServerSettings, loading_name: str = "") -> None:
        # None only while the model loads; the loading middleware keeps handlers from seeing it.
        self.engine: EngineClient = engine  # type: ignore[assignment]
        self.settings = settings
        self.loading_name = loading_name  # the model_name label before the engine can say it
        self.metrics = HttpMetrics(settings.metrics_prefix, self.model_name)
        self.engine_metrics: EngineMetrics | None = None
        self.inflight = InFlight()
        self.rooms = Rooms()  # --role prefill|decode: the rooms this worker holds
        self.draining = False  # set by serve.py on SIGINT/SIGTERM: refuse new work, finish old
        self.created = int(time.time())
        self.inputs = ThreadPoolExecutor(settings.input_workers, thread_name_prefix="conveyor-inputs")
        self.tasks: list[asyncio.Task[None]] = []
        self.running = False  # the app has started (its background tasks may run)
        self._last_output_at: dict[str, float] = {}  # request id -> when its previous delta came

    def model_name(self) -> str:
        return self.engine.model_name if self.engine is not None else self.loading_name

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.engine.model_name, created=self.created, max_model_len=self.engine.max_model_len,
                         root=self.engine.config.model)

    def attach(self, engine: EngineClient) -> None:
        self.engine = engine
        self.engine_metrics = self.metrics.attach(engine)
        # Called on the engine thread; the histogram takes its own lock.
        engine.add_step_observer(self.engine_metrics.iteration_tokens.observe)
        if self.running:
            self._start_tasks()

    def _start_tasks(self) -> None:
        self.tasks.append(asyncio.create_task(watch_engine(self.engine, self.inflight,
                                                          stall_timeout=self.settings.stall_timeout)))
        if self.settings.stats_interval_s > 0:
            logger = StatsLogger(self.engine, self.engine_metrics)
            self.tasks.append(asyncio.create_task(logger.run(self.settings.stats_interval_s)))

    def admit(self, plan: Plan) -> None:
        """Let a plan's requests in, or refuse them; no await between the check and the record."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining:
            raise ApiError(503, "The server is shutting down.", code="shutting_down", headers=retry)
        if not self.engine.is_alive:
            raise ApiError(503, "The engine is not running.", code="engine_dead", headers=retry)
        bound, n = self.settings.max_waiting_requests, len(plan.requests)
        if n > bound:  # n choices are n requests in the queue: this one could never get in
            raise ApiError(400, f"n: {n} choices exceed the server's queue bound of {bound} requests",
                           param="n")
        waiting = max(self.engine.num_waiting(), len(self.inflight.unstarted))
        if waiting + n > bound:
            raise ApiError(429, f"Too many requests waiting ({waiting}); retry later.", code="queue_full",
                           headers=retry)
        self.inflight.admit([r.request_id for r in plan.requests])
        log.debug("request admitted", response_id=plan.response_id, choices=len(plan.requests),
                  prompt_tokens=plan.num_prompt_tokens, max_tokens=plan.requests[0].max_new_tokens if plan.requests
                  else None, stream=plan.stream, waiting=waiting)

    def request_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        prev = self._last_output_at.get(out.request_id)
        if out.finished:
            self._last_output_at.pop(out.request_id, None)
        else:
            self._last_output_at[out.request_id] = now
        assert self.engine_metrics is not None
        self.engine_metrics.observe_output(out, prev, now)

    def request_finished(self, out: RequestOutput) -> None:
        self._last_output_at.pop(out.request_id, None)
        assert self.engine_metrics is not None
        self.engine_metrics.observe_finished(out)
        ttft = out.first_token_time - out.arrival_time if out.first_token_time is not None else None
        e2e = out.finish_time - out.arrival_time if out.finish_time is not None else None
        log.info("request finished", request_id=out.request_id, prompt_tokens=out.num_prompt_tokens,
                 output_tokens=out.num_output_tokens, ttft_s=_round(ttft), e2e_s=_round(e2e),
                 finish_reason=out.finish_reason, error=out.error)


STATE = web.AppKey("conveyor_state", ServerState)


def build_app(engine: EngineClient | None, settings: ServerSettings | None = None,
              loading_name: str = "") -> web.Application:
    """``engine`` None: the app answers 503 "loading" until ``attach_engine(app, engine)``."""
    state = ServerState(None, settings or ServerSettings(), loading_name)
    if engine is not None:
        state.attach(engine)
    # client_max_size makes aiohttp enforce the limit on bodies that arrive without a length.
    app = web.Application(client_max_size=state.settings.max_request_body,
                          middlewares=middlewares(lambda request: request.app[STATE]))
    app[STATE] = state
    app.on_response_prepare.append(lambda request, response: on_response_prepare(request, response, state))
    app.cleanup_ctx.append(_background)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    add_routes(app)
    add_prefill_routes(app)
    return app


def attach_engine(app: web.Application, engine: EngineClient) -> None:
    app[STATE].attach(engine)


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The engine watchdog and the stats line, from the app's start (or the engine's, if later)."""
    state = app[STATE]
    state.running = True
    if state.engine is not None:
        state._start_tasks()
    yield
    state.running = False
    if state.engine is not None and state.engine_metrics is not None:
        state.engine.remove_step_observer(state.engine_metrics.iteration_tokens.observe)
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    state.inputs.shutdown(wait=False, cancel_futures=True)


# -- routes ---------------------------------------------------------------------------------
async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.engine.config.role == "prefill":
        raise refuse_generate("prefill")
    plan = await _off_loop(state, completion_plan, await _read_body(request, CompletionRequest))
    return await _run(request, plan, CompletionRenderer(plan, state.engine.model_name, state.engine.tokenizer))


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.engine.config.role == "prefill":
        raise refuse_generate("prefill")
    plan = await _off_loop(state, chat_plan, await _read_body(request, ChatCompletionRequest))
    return await _run(request, plan, ChatRenderer(plan, state.engine.model_name, state.engine.tokenizer))


async def _off_loop(state: ServerState, make_plan: Callable[[EngineClient, Body, ServerSettings], Plan],
                    body: Body) -> Plan:
    """Tokenizing a long prompt, or compiling a large schema, takes seconds: it must not hold every
    other stream's chunks."""
    return await asyncio.get_running_loop().run_in_executor(state.inputs, make_plan, state.engine, body,
                                                            state.settings)


async def _models(request: web.Request) -> web.Response:
    return _json(ModelList(data=[request.app[STATE].model_card()]))


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is None:
        raise ApiError(503, "The model is loading.", code="loading",
                       headers={"Retry-After": str(state.settings.retry_after_s)})
    if state.draining or not state.engine.is_alive:
        # 503 while draining too: a load balancer should stop sending before the port closes.
        raise ApiError(503, "shutting down" if state.draining else "engine is not running", code="unhealthy")
    if (stalled := state.engine.stalled_for()) > state.settings.stall_timeout:
        raise ApiError(503, f"the engine has made no progress for {stalled:.0f} s with requests waiting",
                       code="unhealthy")
    return web.json_response({"status": "ok", "role": state.engine.config.role})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# -- request plumbing -----------------------------------------------------------------------
async def _read_body(request: web.Request, kind: type[Body]) -> Body:
    limit = request.app[STATE].settings.max_request_body
    too_large = ApiError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large  # refuse before reading; aiohttp drains the rest in the background
    timeout = request.app[STATE].settings.body_timeout
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
        raise too_large from None
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout:g} s.", code="request_timeout",
                       headers={"Connection": "close"}) from None
    try:
        # Typed first, so a bad value's error names its field (an untyped decode of 1e999 cannot);
        # then untyped, to find the names the wire types do not know.
        body = msgspec.json.decode(raw, type=kind)
        check_unknown_fields(msgspec.json.decode(raw), kind, request.app[STATE].settings.ignore_unknown_fields,
                             request.path)
        return body
    except msgspec.ValidationError as e:
        raise from_validation_error(e) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise bad_request(None, f"The body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec's depth guard: the body nests arrays/objects ~1000 deep
        raise bad_request(None, "The body nests JSON arrays or objects too deeply.") from None


async def _run(request: web.Request, plan: Plan, renderer: Renderer) -> web.StreamResponse:
    state = request.app[STATE]
    rooms = bind_rooms(request, plan.requests, state.rooms) if state.engine.config.role == "decode" else []
    try:
        state.admit(plan)
    except ApiError:
        unbind_rooms(state.rooms, rooms)
        raise
    outputs = run_choices(state.engine, plan.requests, state.inflight, state.request_finished, state.request_output)
    try:
        if plan.stream:
            return await _stream(request, plan, renderer, outputs)
        return await _collect(renderer, outputs)
    finally:
        unbind_rooms(state.rooms, rooms)
        if state.engine_metrics is not None:  # finished requests' token lists no longer move
            state.engine_metrics.observe_plan(plan.requests)
        # run_choices lets go of its requests when it runs; this covers a stream that never started.
        for req in plan.requests:
            state.inflight.done(req.request_id)


async def _collect(renderer: Renderer, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> web.Response:
    try:
        async with aclosing(outputs) as outs:
            async for i, out in outs:
                renderer.add(i, out)
    except EngineDeadError as e:
        raise ApiError(503, f"The engine stopped: {e}", code="engine_dead") from None
    errors = [c.error or "engine error" for c in renderer.choices if c.finish_reason == "error"]
    if errors and all(e.startswith(FAILURE) for e in errors):  # the prefill side failed: worth a retry
        raise ApiError(503, errors[0], code="kv_transfer_failed", headers={"Retry-After": "1"})
    if errors:
        raise ApiError(500, f"The engine failed the request: {errors[0]}", code="engine_error")
    return _json(renderer.response())


async def _stream(request: web.Request, plan: Plan, renderer: Renderer,
                  outputs: AsyncIterator[tuple[int, RequestOutput]]) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    timeout = request.app[STATE].settings.write_timeout

    async def write(data: bytes | None) -> None:  # None: the end of the stream
        # A client that stops reading fills the socket buffers, and then write waits for it forever.
        try:
            await asyncio.wait_for(resp.write(data) if data is not None else resp.write_eof(), timeout)
        except TimeoutError:
            log.warning("client stopped reading; aborting its stream", response_id=plan.response_id,
                        write_timeout_s=timeout)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("write timed out") from None

    try:
        await resp.prepare(request)
        for chunk in renderer.opening():
            await write(sse(chunk))
        async with aclosing(outputs) as outs:
            async for i, out in outs:
                if out.finish_reason == "error":  # the OpenAI client raises on an "error" event
                    await write(_error_event(out.error or "engine error", "engine_error"))
                if (chunk := renderer.chunk(i, out)) is not None:
                    await write(sse(chunk))
        if plan.include_usage:
            await write(sse(renderer.usage_chunk()))
        await write(SSE_DONE)
        await write(None)
    except ConnectionResetError:
        # The client went away and aiohttp said so on a write (handler cancellation off);
        # leaving the async-with above already closed run_choices, which aborted the requests.
        log.info("client disconnected mid-stream", response_id=plan.response_id)
    except asyncio.CancelledError:  # the same, told by cancelling this handler (serve.py's setting)
        log.info("client disconnected mid-stream", response_id=plan.response_id)
        raise
    except Exception as e:  # headers are gone already: say it in the stream, then end it cleanly
        if not resp.prepared:
            raise
        if isinstance(e, EngineDeadError):
            event = _error_event(f"The engine stopped: {e}", "engine_dead")
        else:
            log.exception("stream failed", response_id=plan.response_id)
            event = _error_event("Internal server error.", "internal_error")
        try:
            await write(event)
            await write(SSE_DONE)
            await write(None)
        except ConnectionResetError:
            pass
    return resp


def _error_event(message: str, code: str) -> bytes:
    return sse(ErrorResponse(error=ErrorBody(message=message, type="server_error", code=code)))


def _json(body: msgspec.Struct) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
