"""Sends work items at their arrival offsets, at most ``max_concurrency`` at a time, for ``duration``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tqdm import tqdm

from conveyor.runtime.tools.loadgen.client import RequestRecord
from conveyor.runtime.tools.loadgen.workloads import WorkItem

Send = Callable[[WorkItem, int, float], Awaitable[RequestRecord]]


async def run_load(items: list[WorkItem], offsets: list[float], send: Send, *, max_concurrency: int | None = None,
                   duration_s: float | None = None, progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Every request sent, with its record, and the run's wall time in seconds.

    A request is sent when its offset has passed and (with a limit) a slot is free; with rate inf
    and a limit this is a closed loop of ``max_concurrency`` clients. After ``duration_s`` nothing
    new is sent and the requests in flight are waited for: each one sent is recorded, none dropped.
    """
    if len(offsets) != len(items):
        raise ValueError(f"{len(items)} items but {len(offsets)} arrival offsets")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(items), disable=not progress, unit="req", dynamic_ncols=True)

    async def one(item: WorkItem, index: int, t0: float) -> RequestRecord:
        try:
            return await send(item, index, t0)
        finally:
            if slots is not None:
                slots.release()
            bar.update(1)

    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    try:
        for index, (item, offset) in enumerate(zip(items, offsets, strict=True)):
            if duration_s is not None and offset >= duration_s:
                break
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process itself: this is what is measured
            if slots is not None:
                await slots.acquire()
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                if slots is not None:
                    slots.release()
                break
            tasks.append(asyncio.create_task(one(item, index, t0)))
        records = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # cancelled from outside (Ctrl-C): don't leave requests running
            task.cancel()
        bar.close()
    return records, time.perf_counter() - t0
