"""Run the app and the engine in one process, on one event loop, with a graceful shutdown.

The port is bound first: while the model loads, /health says 503 "loading" (a probe can tell a
slow start from a dead one) and the rest say 503 too; then the engine is attached.

SIGINT/SIGTERM: stop accepting (close the listening socket, /health and new requests say 503),
give running requests ``shutdown_timeout`` seconds to finish, abort what is left (their streams
end with ``finish_reason: "abort"`` and ``[DONE]``), then stop the engine and return 0. A second
signal skips the wait.
"""

from __future__ import annotations

import asyncio
import signal
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import STATE, ServerSettings, ServerState, attach_engine, build_app
from conveyor.runtime.server.errors import ApiError

log = structlog.get_logger("conveyor.server")

ABORT_GRACE_S = 5.0  # after aborting: time for handlers to write their last chunk


def make_runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: aiohttp otherwise lets a handler run on after its client left, and a
    # non-streaming request would hold its KV pages until it finished; cancelled, it aborts.
    return _Runner(app, handler_cancellation=True, access_log=None, shutdown_timeout=ABORT_GRACE_S,
                   handle_signals=False, keepalive_timeout=app[STATE].settings.keepalive_timeout)


class _JsonErrorHandler(RequestHandler):
    """aiohttp's HTTP parser answers malformed requests itself, in plain text; say it in OpenAI's shape."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response already began
        text = "Internal server error." if status == 500 else (getattr(exc, "message", None) or message
                                                               or HTTPStatus(status).phrase)
        resp = ApiError(status, str(text), code="bad_http_request" if status != 500 else "internal_error").response()
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # the same server; only the protocol it makes differs
        return server


async def serve(config: EngineConfig, settings: ServerSettings) -> int:
    signals = _SignalWatcher()  # before the model loads: a SIGTERM during a slow load still exits 0
    app = build_app(None, settings, loading_name=config.served_model_name or config.model)
    state = app[STATE]
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
    log.info("loading model", model=config.model, host=settings.host, port=settings.port)
    try:
        engine = await AsyncEngine.create(config)
    except BaseException:
        await runner.cleanup()
        raise
    attach_engine(app, engine)

    log.info("serving", model=engine.model_name, url=f"http://{settings.host}:{settings.port}",
             host=settings.host, port=settings.port)
    await signals.first.wait()

    state.draining = True
    await site.stop()  # stop accepting; requests already in flight keep their connections
    await _drain(state, settings.shutdown_timeout, signals.second)
    await runner.cleanup()
    await engine.shutdown()
    signals.remove()
    log.info("server stopped")
    return 0


async def _drain(state: ServerState, timeout: float, hurry: asyncio.Event) -> None:
    inflight = state.inflight
    log.info("shutting down", in_flight=len(inflight.ids), timeout_s=timeout)
    hurried = asyncio.create_task(hurry.wait())
    idle = asyncio.create_task(inflight.wait_idle(timeout))
    await asyncio.wait([idle, hurried], return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if inflight.ids:
        log.warning("aborting requests still running at shutdown", count=len(inflight.ids))
        for rid in list(inflight.ids):
            await state.engine.abort(rid)
        await inflight.wait_idle(ABORT_GRACE_S)
    idle.cancel()


class _SignalWatcher:
    """First SIGINT/SIGTERM sets ``first`` (drain), the next sets ``second`` (stop waiting)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        (self.second if self.first.is_set() else self.first).set()

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.remove_signal_handler(sig)
