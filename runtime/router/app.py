"""The router's aiohttp app: the OpenAI routes relayed to workers, /health, /metrics.

Plain mode (``--worker``): each request goes to one replica chosen by the cache-aware policy.
PD mode (``--prefill``/``--decode``): the router picks a (P, D) pair, mints the room id (the router
owns ids: SGLang #40125 was duplicate rooms) and sends the client's request unchanged to D with
``X-Conveyor-Room`` and ``X-Conveyor-Prefill``; D does the rest. Either way the worker's answer
(status, JSON or SSE) goes back as it came, chunk by chunk, and a client that leaves closes the
router's connection to the worker at once, which the worker treats as an abort.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from conveyor.runtime.router.config import RouterSettings
from conveyor.runtime.router.health import HealthChecker
from conveyor.runtime.router.keys import routing_key
from conveyor.runtime.router.metrics import CONTENT_TYPE, RouterMetrics, scrape_workers
from conveyor.runtime.router.policy import CacheAwarePolicy, Choice
from conveyor.runtime.router.prefix_tree import PrefixTree
from conveyor.runtime.router.workers import Role, Worker, WorkerPool, normalize_url

log = structlog.get_logger("conveyor.router")

ROOM_HEADER = "X-Conveyor-Room"
PREFILL_HEADER = "X-Conveyor-Prefill"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")  # what the workers accept as X-Request-Id
# Per-connection headers, and the ones aiohttp sets itself; never copied across the router.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length", "date", "server"})


class RouterError(Exception):
    """An answer the router gives itself, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after, self.extra = status, message, code, retry_after, extra

    def response(self) -> web.Response:
        kind = "service_unavailable" if self.status == 503 else "server_error" if self.status >= 500 \
            else "invalid_request_error"
        body = {"error": {"message": self.message, "type": kind, "param": None, "code": self.code},
                **(self.extra or {})}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return web.json_response(body, status=self.status, headers=headers)


class RouterState:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings

        def pool(role: Role, urls: tuple[str, ...]) -> WorkerPool:
            return WorkerPool(role, [Worker(normalize_url(u), role, PrefixTree(settings.policy.max_tree_chars))
                                     for u in urls])

        if settings.pd:
            self.pools = {"prefill": pool("prefill", settings.prefill), "decode": pool("decode", settings.decode)}
        else:
            self.pools = {"both": pool("both", settings.workers)}
        self.policy = CacheAwarePolicy(settings.policy)
        self.metrics = RouterMetrics(self.all_workers)
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # made on the app's loop
        self.health: HealthChecker = None  # type: ignore[assignment]
        self.draining = False
        self.starting = False  # --launch: until every launched worker has answered /health
        self.tasks: list[asyncio.Task[None]] = []

    def all_workers(self) -> list[Worker]:
        return [w for p in self.pools.values() for w in p.workers]

    def front_pool(self) -> WorkerPool:
        """The pool clients' requests land on: D in PD mode."""
        return self.pools["decode" if self.settings.pd else "both"]

    def missing_roles(self) -> list[str]:
        return [role for role, p in self.pools.items() if not p.healthy()]

    def worker_report(self) -> list[dict[str, Any]]:
        return [{"url": w.url, "role": w.role, "healthy": w.healthy, "reason": w.reason, "in_flight": w.in_flight,
                 "served": w.served, "metrics": w.url + "/metrics"} for w in self.all_workers()]

    def choose(self, role: Role, key: str, exclude: set[Worker]) -> Choice:
        candidates = [w for w in self.pools[role].healthy() if w not in exclude]
        if not candidates:
            self.metrics.no_worker.labels(role).inc()
            what = f"healthy {role} worker" if role != "both" else "healthy worker"
            why = "every one refused the connection" if exclude else "none is available"
            raise RouterError(503, f"No {what}: {why}.", "no_healthy_worker", self.settings.retry_after_s)
        choice = self.policy.choose(candidates, key)
        self.metrics.decisions.labels(role, choice.reason).inc()
        return choice


STATE = web.AppKey("router_state", RouterState)


def build_router_app(settings: RouterSettings) -> web.Application:
    state = RouterState(settings)
    app = web.Application(client_max_size=settings.max_request_body, middlewares=[_errors])
    app[STATE] = state
    app.cleanup_ctx.append(_background)
    app.router.add_post("/v1/completions", _relay)
    app.router.add_post("/v1/chat/completions", _relay)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    # No pool limit: the router holds one upstream connection per relayed request, as many as clients.
    # auto_decompress off: bytes go through as the worker sent them, with its Content-Encoding.
    state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                          timeout=aiohttp.ClientTimeout(total=None,
                                                                        sock_connect=state.settings.connect_timeout))
    state.health = HealthChecker(state.session, state.all_workers(), state.settings.health_interval,
                                 state.settings.health_timeout, on_change=lambda w: state.metrics.health_changes.labels(
                                     w.url, "1" if w.healthy else "0").inc())
    await state.health.check_all()  # before the first request: no 503 only for want of a first round
    state.tasks.append(asyncio.create_task(state.health.run()))
    yield
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    await state.session.close()


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as e:
        if e.status >= 500 and request.path != "/health":  # probes poll; the health change is logged once
            log.warning("request refused", path=request.path, status=e.status, code=e.code, reason=e.message)
        return e.response()


# -- routes ---------------------------------------------------------------------------------
async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    workers = state.worker_report()
    if state.draining:
        raise RouterError(503, "The router is shutting down.", "unhealthy", state.settings.retry_after_s,
                          {"workers": workers})
    if state.starting:
        raise RouterError(503, "The workers are starting.", "loading", state.settings.retry_after_s,
                          {"workers": workers})
    if missing := state.missing_roles():
        names = " and ".join("healthy worker" if r == "both" else f"healthy {r} worker" for r in missing)
        raise RouterError(503, f"No {names}.", "unhealthy", state.settings.retry_after_s, {"workers": workers})
    return web.json_response({"status": "ok", "mode": "pd" if state.settings.pd else "replicas",
                              "workers": workers})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    own = state.metrics.render_own()
    scraped = await scrape_workers(state.session, state.all_workers(), state.settings.scrape_timeout)
    return web.Response(body=own + scraped, headers={"Content-Type": CONTENT_TYPE})


async def _models(request: web.Request) -> web.Response:
    """From a healthy worker of the front pool: they all serve the same model."""
    state = request.app[STATE]
    for worker in state.front_pool().healthy():
        try:
            async with state.session.get(worker.url + "/v1/models", headers=_forward_headers(request, None)) as up:
                return web.Response(status=up.status, body=await up.read(), headers=_reply_headers(up))
        except aiohttp.ClientConnectorError as e:
            state.health.failed(worker, f"connection failed: {e}")
    raise RouterError(503, "No healthy worker to ask for the model list.", "no_healthy_worker",
                      state.settings.retry_after_s)


@dataclass
class _Sent:
    """A request a worker has accepted: its answer, and the workers whose in-flight count it holds."""

    upstream: aiohttp.ClientResponse
    target: Choice
    prefill: Choice | None
    room: str | None
    holds_prefill: bool = True

    def release_prefill(self) -> None:
        """D's first byte of answer: P's part (the prompt, its KV sent) is over, so is its load."""
        if self.prefill is not None and self.holds_prefill:
            self.holds_prefill = False
            self.prefill.worker.in_flight -= 1

    def release(self) -> None:
        self.release_prefill()
        self.target.worker.in_flight -= 1


async def _relay(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.draining:
        raise RouterError(503, "The router is shutting down.", "shutting_down", state.settings.retry_after_s)
    started = time.monotonic()
    body = await _read_body(request, state.settings)
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None  # the worker answers it with a 400 in its own words
    request_id = request.headers.get("X-Request-Id", "")
    if not _REQUEST_ID.match(request_id):
        request_id = uuid.uuid4().hex
    sent = await _send(request, body, routing_key(request.path, parsed), request_id)
    outcome = "upstream_error"
    try:
        response, outcome = await _send_back(request, sent)
        return response
    except asyncio.CancelledError:
        outcome = "client_disconnect"
        raise
    finally:
        sent.upstream.close()  # at once, not back to the pool: an unfinished answer means the worker must abort
        sent.release()
        state.metrics.requests.labels(sent.target.worker.url, outcome).inc()
        log.info("request relayed", path=request.path, worker=sent.target.worker.url,
                 prefill=sent.prefill.worker.url if sent.prefill else None, room=sent.room,
                 reason=sent.target.reason, status=sent.upstream.status, outcome=outcome,
                 duration_s=round(time.monotonic() - started, 4), x_request_id=request_id)


async def _send(request: web.Request, body: bytes, key: str, request_id: str) -> _Sent:
    """Choose the worker(s) and send; a refused connection (nothing sent) goes to another, nothing else does."""
    state = request.app[STATE]
    refused: set[Worker] = set()
    while True:
        prefill, room, extra = None, None, {"X-Request-Id": request_id}
        if state.settings.pd:
            prefill = state.choose("prefill", key, set())
            room = uuid.uuid4().hex  # per attempt: a D that refused the connection never saw the last one
            extra |= {ROOM_HEADER: room, PREFILL_HEADER: prefill.worker.url}
        target = state.choose("decode" if state.settings.pd else "both", key, refused)
        sent_to = [target.worker] + ([prefill.worker] if prefill else [])
        for w in sent_to:
            w.in_flight += 1
            w.served += 1
        try:
            upstream = await state.session.post(target.worker.url + request.path, data=body,
                                                headers=_forward_headers(request, extra))
            return _Sent(upstream, target, prefill, room)
        except BaseException as e:
            for w in sent_to:
                w.in_flight -= 1
            if isinstance(e, aiohttp.ClientConnectorError):
                state.health.failed(target.worker, f"connection failed: {e}")
                state.metrics.retries.labels(target.worker.url).inc()
                refused.add(target.worker)
                log.warning("worker refused the connection; trying another", worker=target.worker.url, error=str(e))
                continue
            # The client left (cancelled), or the worker took the request and failed before answering.
            outcome = "client_disconnect" if isinstance(e, asyncio.CancelledError) else "upstream_error"
            state.metrics.requests.labels(target.worker.url, outcome).inc()
            if isinstance(e, aiohttp.ClientError):
                raise RouterError(502, f"The worker failed before answering: {type(e).__name__}.",
                                  "worker_failed") from None
            raise


async def _send_back(request: web.Request, sent: _Sent) -> tuple[web.StreamResponse, str]:
    upstream = sent.upstream
    outcome = "ok" if upstream.status < 400 else "client_error" if upstream.status < 500 else "server_error"
    if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        try:
            data = await upstream.read()
        except aiohttp.ClientError as e:
            raise RouterError(502, f"The worker failed while answering: {type(e).__name__}.", "worker_failed") \
                from None
        return web.Response(status=upstream.status, body=data, headers=_reply_headers(upstream)), outcome
    resp = web.StreamResponse(status=upstream.status, headers=_reply_headers(upstream))
    await resp.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():  # as it arrives: no buffering of the stream
            sent.release_prefill()
            await resp.write(chunk)
    except aiohttp.ClientPayloadError as e:  # the worker died mid-stream: end it the way a worker ends a failure
        log.warning("worker failed mid-stream", worker=str(upstream.url.origin()), error=str(e))
        error = {"error": {"message": "The worker failed during the stream.", "type": "server_error",
                           "param": None, "code": "worker_failed"}}
        await resp.write(b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n")
        outcome = "upstream_error"
    except ConnectionResetError:  # writing to a client that has gone
        return resp, "client_disconnect"
    await resp.write_eof()
    return resp, outcome


# -- plumbing -------------------------------------------------------------------------------
async def _read_body(request: web.Request, settings: RouterSettings) -> bytes:
    limit = settings.max_request_body
    too_large = RouterError(413, f"Request body is larger than {limit} bytes.", "request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await asyncio.wait_for(request.read(), settings.body_timeout)
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except TimeoutError:
        raise RouterError(408, f"The request body did not arrive within {settings.body_timeout:g} s.",
                          "request_timeout") from None


def _forward_headers(request: web.Request, extra: dict[str, str] | None) -> CIMultiDict[str]:
    # A client must not name the room or the prefill worker: the router owns both.
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP
                          and not k.lower().startswith("x-conveyor-"))
    headers.update(extra or {})
    return headers


def _reply_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
