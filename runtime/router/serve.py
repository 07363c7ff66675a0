"""Run the router: bind first (/health says 503 until workers answer), then relay until a signal.

With ``--launch``, the workers are started before the port is bound and waited for (their /health,
within ``launch_timeout``; until then the router's /health says 503 "loading"); a child that dies
while starting stops everything with an error.
SIGINT/SIGTERM: stop accepting, stop the children (they drain and end their streams), give relayed
requests ``shutdown_timeout`` seconds, exit 0.
"""

from __future__ import annotations

import asyncio
import signal

import msgspec
import structlog
from aiohttp import web

from conveyor.runtime.router.app import STATE, build_router_app
from conveyor.runtime.router.config import RouterSettings
from conveyor.runtime.router.launcher import ChildSpec, Launcher

log = structlog.get_logger("conveyor.router")


class LaunchPlan(msgspec.Struct, frozen=True, kw_only=True):
    children: tuple[ChildSpec, ...]
    ready_timeout: float = 600.0  # the first start may download the model
    stop_timeout: float = 40.0  # past a worker's default 30 s drain


async def run_router(settings: RouterSettings, launch: LaunchPlan | None = None) -> int:
    signals = _SignalWatcher()
    launcher: Launcher | None = None
    app = build_router_app(settings)
    state = app[STATE]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False,
                           shutdown_timeout=settings.shutdown_timeout)
    state.starting = launch is not None
    try:
        if launch is not None:
            launcher = Launcher(launch.children, launch.stop_timeout,
                                on_exit=lambda spec, rc: _child_exited(app, spec, rc))
            await launcher.start()
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as e:
            raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
        for spec, rc in launcher.exited() if launcher else ():  # died before the router could watch
            _child_exited(app, spec, rc)
        url = f"http://{settings.host}:{settings.port}"
        if launch is not None:
            log.info("waiting for workers", url=url, count=len(launch.children), timeout_s=launch.ready_timeout)
            ready = asyncio.create_task(_wait_ready(app, launch.ready_timeout))
            stop = asyncio.create_task(signals.first.wait())
            await asyncio.wait([ready, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not ready.done():
                ready.cancel()
            elif (err := ready.exception()) is not None:
                log.error("workers did not start", reason=str(err))
                return 1
            state.starting = False
        if not signals.first.is_set():
            log.info("routing", url=url, mode="pd" if settings.pd else "replicas",
                     workers=[w.url for w in state.all_workers()])
            await signals.first.wait()
        state.draining = True
        log.info("shutting down")
        await site.stop()
    finally:
        if launcher is not None:
            await launcher.stop()
        await runner.cleanup()
        signals.remove()
    log.info("router stopped")
    return 0


def _child_exited(app: web.Application, spec: ChildSpec, rc: int) -> None:
    state = app[STATE]
    worker = next((w for w in state.all_workers() if w.url == spec.url), None)
    if worker is not None and state.health is not None:
        state.health.mark_dead(worker, f"the worker process exited with code {rc}")


async def _wait_ready(app: web.Application, timeout: float) -> None:
    state = app[STATE]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        workers = state.all_workers()
        if dead := [w for w in workers if w.url in state.health.dead]:
            raise RuntimeError("; ".join(f"{w.url}: {state.health.dead[w.url]}" for w in dead))
        if all(w.healthy for w in workers):
            return
        if loop.time() > deadline:
            raise RuntimeError(f"not healthy within {timeout:g} s: " + "; ".join(
                f"{w.url}: {w.reason}" for w in workers if not w.healthy))
        await asyncio.sleep(0.2)
        await state.health.check_all()


class _SignalWatcher:
    """SIGINT/SIGTERM set ``first``: shut down (later ones change nothing; the bounds still hold)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.first = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        self.first.set()

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.remove_signal_handler(sig)
