"""Running one HTTP request's engine requests side by side, and the server's record of them.

Ownership: an engine request is the server's from admission (``InFlight.admit``) until
``run_choices`` lets go of it in its ``finally``; leaving early cancels the per-choice pumps,
and each pump's ``engine.submit`` stream aborts its request in the engine as it closes, which
frees its KV pages at the engine's next command drain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

import structlog

from conveyor.runtime.engine.client import EngineClient, EngineDeadError
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.scheduler import Request

log = structlog.get_logger("conveyor.server")


class InFlight:
    """Engine requests this server submitted and has not let go of yet.

    ``unstarted`` backs admission: the engine's own waiting counter moves only when its thread
    drains commands at the top of a step, so a burst that lands inside one step would slip past
    it. A request counts as unstarted until its first output (token or finish) comes back.
    ``ids`` backs graceful shutdown: what to wait for, and what to abort once the wait is over.
    """

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.unstarted: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._readers: set[asyncio.Queue[tuple[int, RequestOutput | BaseException]]] = set()

    def listen(self, queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]]) -> None:
        self._readers.add(queue)

    def unlisten(self, queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]]) -> None:
        self._readers.discard(queue)

    def fail_all(self, error: BaseException) -> None:
        """Wake every listening reader with ``error``: the engine thread is gone, no output will come."""
        for queue in self._readers:
            queue.put_nowait((-1, error))

    def admit(self, request_ids: Sequence[str]) -> None:
        self.ids.update(request_ids)
        self.unstarted.update(request_ids)
        self._idle.clear()

    def started(self, request_id: str) -> None:
        self.unstarted.discard(request_id)

    def done(self, request_id: str) -> None:
        self.ids.discard(request_id)
        self.unstarted.discard(request_id)
        if not self.ids:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight; False if ``timeout`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


async def run_choices(
    engine: EngineClient,
    requests: Sequence[Request],
    inflight: InFlight,
    on_finish: Callable[[RequestOutput], None],
    on_output: Callable[[RequestOutput], None] | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield ``(choice index, output delta)`` from all of a plan's requests as they arrive.

    ``on_finish`` sees every request's last output exactly once, including a synthesized
    ``abort`` for a request that the caller stopped reading (a client that went away);
    ``on_output`` sees every delta the engine sent, as it arrives (per-token metrics).
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
    last: list[RequestOutput | None] = [None] * len(requests)

    async def pump(i: int, req: Request) -> None:
        try:
            async with aclosing(engine.submit(req)) as outs:
                async for out in outs:
                    queue.put_nowait((i, out))
        except Exception as e:  # hand it to the reader, who decides what the client sees
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, req)) for i, req in enumerate(requests)]
    remaining = len(requests)
    inflight.listen(queue)
    if not engine.is_alive:  # died before we were listening: watch_engine has fired already
        queue.put_nowait((-1, EngineDeadError("the engine stopped running")))
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            inflight.started(requests[i].request_id)
            last[i] = item
            if on_output is not None:
                on_output(item)
            if item.finished:
                remaining -= 1
                on_finish(item)
            yield i, item
    finally:
        # Bookkeeping first, before any await: a second cancellation (server shutdown) may
        # interrupt the gather below, and the record must not leak in that case.
        inflight.unlisten(queue)
        now = time.monotonic()
        for i, req in enumerate(requests):
            out = last[i]
            if out is None or not out.finished:
                on_finish(_aborted(req, out, now))
            inflight.done(req.request_id)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _aborted(req: Request, last: RequestOutput | None, now: float) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id, text="", token_ids=[], finished=True, finish_reason="abort",
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens if last is not None else 0,
        arrival_time=req.arrival_time,
        scheduled_time=req.admit_time,
        first_token_time=last.first_token_time if last is not None else None,
        finish_time=now,
    )


async def watch_engine(engine: EngineClient, inflight: InFlight, period_s: float = 0.5,
                       stall_timeout: float = 60.0) -> None:
    """Fail in-flight requests if the engine thread dies (its streams would otherwise wait forever);
    log once per stall what the engine holds when it makes no progress with work waiting."""
    stalled = False
    while engine.is_alive:
        await asyncio.sleep(period_s)
        now_stalled = engine.stalled_for() > stall_timeout
        if now_stalled and not stalled:
            s = engine.stats()
            log.error("engine stalled: no progress with requests waiting", stalled_s=round(engine.stalled_for(), 1),
                      in_flight=len(inflight.ids), running=s.num_running, waiting=s.num_waiting,
                      kv_pages_used=s.kv_pages_used, kv_pages_promised=s.kv_pages_promised,
                      kv_pages_total=s.kv_pages_total)
        elif stalled and not now_stalled:
            log.info("engine progressing again")
        stalled = now_stalled
    if inflight.ids:
        log.error("engine thread died; failing in-flight requests", count=len(inflight.ids))
    inflight.fail_all(EngineDeadError("the engine stopped running"))
