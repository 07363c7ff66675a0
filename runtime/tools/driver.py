"""The one loop that pushes a workload through an engine: submit each request at its arrival, step
until everything finishes, and wait (never spin) while the policy holds requests back on purpose.

The offline ``LLM``, ``conveyor compare``, the simulator (on its simulated clock) and the tests all
drive the engine through here; the async engine's thread has a loop of its own (commands, streams).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from conveyor.runtime.engine.core import STALL_POLL_S, EngineCore
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.scheduler import Request

T = TypeVar("T")


class Clock(Protocol):
    def __call__(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    def __call__(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


WALL_CLOCK = WallClock()


def replay(core: EngineCore, items: Sequence[T], arrival_s: Callable[[T], float],
           make_request: Callable[[T, float], Request], *, clock: Clock = WALL_CLOCK, stall_s: float = STALL_POLL_S,
           before_step: Callable[[float], None] | None = None,
           after_step: Callable[[list[RequestOutput]], None] | None = None) -> tuple[list[Request], float]:
    """Submit each item ``arrival_s(item)`` seconds after the start and step until all finish; the
    requests and the start time.

    ``make_request(item, t0)`` builds an item's request; ``before_step(seconds since t0)`` runs every
    loop turn after arrivals are submitted, ``after_step(outputs)`` after every step. A stalled step
    (a static batch filling up) waits ``stall_s``, or until the next arrival if that comes sooner.
    """
    pending = deque(sorted(items, key=arrival_s))
    reqs: list[Request] = []
    t0 = clock()
    while pending or core.has_work():
        now = clock()
        while pending and t0 + arrival_s(pending[0]) <= now:
            req = make_request(pending.popleft(), t0)
            core.add_request(req)
            reqs.append(req)
        if before_step is not None:
            before_step(now - t0)
        if core.has_work():
            outputs = core.step()
            if after_step is not None:
                after_step(outputs)
            if core.stalled:
                clock.sleep(min(stall_s, t0 + arrival_s(pending[0]) - now) if pending else stall_s)
        elif pending:  # idle until the next arrival: this wait is the arrival process itself
            clock.sleep(t0 + arrival_s(pending[0]) - clock())
    return reqs, t0


def run_until_idle(core: EngineCore, requests: Sequence[Request] = (),
                   after_step: Callable[[list[RequestOutput]], None] | None = None) -> None:
    """Submit ``requests`` at once and step until the engine has nothing left."""
    replay(core, requests, lambda r: 0.0, lambda r, t0: r, after_step=after_step)
