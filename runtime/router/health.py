"""Periodic health checks: each worker's GET /health, bounded by a timeout, every ``interval`` seconds.

A worker is healthy while /health answers 200 and reports the role it was registered for (a body
without ``role``, such as today's empty 200, means ``both``). Anything else takes it out with the
reason: refused, timed out, 503 (loading, draining, stalled), or a role mismatch. The next good
answer puts it back. A refused connection on a request takes a worker out at once, without
waiting for the next round.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import aiohttp
import structlog

from conveyor.runtime.router.workers import Worker

log = structlog.get_logger("conveyor.router")


async def probe(session: aiohttp.ClientSession, worker: Worker, timeout: float) -> str | None:
    """None when healthy, else why not."""
    try:
        async with session.get(worker.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status != 200:
                return f"/health answered {resp.status}{_error_code(body)}"
    except TimeoutError:
        return f"/health did not answer within {timeout:g} s"
    except aiohttp.ClientError as e:
        return f"/health failed: {type(e).__name__}: {e}"
    role = _role(body)
    if role != worker.role:
        return f"role mismatch: registered as {worker.role}, the worker says {role}"
    return None


def _role(body: bytes) -> str:
    try:
        data = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return "both"
    role = data.get("role", "both") if isinstance(data, dict) else "both"
    return role if isinstance(role, str) else "both"


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
        return f" ({code})" if isinstance(code, str) else ""
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return ""


class HealthChecker:
    def __init__(self, session: aiohttp.ClientSession, workers: Sequence[Worker], interval: float, timeout: float,
                 on_change: Callable[[Worker], None] = lambda w: None) -> None:
        self.session = session
        self.workers = workers
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self.dead: dict[str, str] = {}  # url -> why the launcher knows it will never answer again
        self._wake = asyncio.Event()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def check(self, worker: Worker) -> None:
        reason = self.dead.get(worker.url) or await probe(self.session, worker, self.timeout)
        self.apply(worker, reason)

    def apply(self, worker: Worker, reason: str | None) -> None:
        if reason is None:
            changed = worker.mark_healthy()
            if changed:
                log.info("worker healthy", worker=worker.url, role=worker.role)
        else:
            changed = worker.mark_unhealthy(reason)
            if changed:
                log.warning("worker unhealthy", worker=worker.url, role=worker.role, reason=reason)
            else:
                worker.reason = reason
        if changed:
            self.on_change(worker)

    def mark_dead(self, worker: Worker, reason: str) -> None:
        """The launcher saw the process exit: no health check may put it back."""
        self.dead[worker.url] = reason
        self.apply(worker, reason)

    def failed(self, worker: Worker, reason: str) -> None:
        """A request could not connect: out now, and the next round checks again soon."""
        self.apply(worker, reason)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.check_all()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
