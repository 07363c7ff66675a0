"""Scheduling policies: the order of the waiting queue, the order of running requests, and victims.

The scheduler asks; the policy decides. Policies are pure Python and know nothing of memory.
This module holds the protocol and FCFS; every other policy has a file in ``scheduler/policies/``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from conveyor.scheduler.request import Request


class SchedulerLoad(NamedTuple):
    """What the scheduler sees of the load at the start of a step; policies may adapt to it."""

    now: float  # the scheduler clock (time.monotonic unless a simulator injects one)
    num_waiting: int
    num_running: int
    kv_usage: float  # fraction of KV pages held by requests, 0-1
    free_slots: int


class SchedulingPolicy(Protocol):
    name: str

    def add(self, request: Request) -> None:
        """A new arrival joins the waiting queue."""
        ...

    def requeue(self, request: Request) -> None:
        """A preempted request goes back to wait; it has already waited once."""
        ...

    def remove(self, request: Request) -> None: ...

    def peek(self) -> Request | None:
        """The waiting request to admit next (it stays queued until ``pop``)."""
        ...

    def pop(self) -> Request: ...

    def num_waiting(self) -> int: ...

    def waiting(self) -> Iterable[Request]: ...

    def order_running(self, running: list[Request]) -> list[Request]:
        """Running requests in the order they get the step's token budget."""
        ...

    def victim(self, candidates: list[Request]) -> Request:
        """Which of ``candidates`` to preempt when memory runs out."""
        ...

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        """Running requests to preempt now so more urgent waiting ones get their slots.

        Asked only when every slot is taken and something waits; most policies name none.
        """
        ...

    def on_finish(self, request: Request) -> None:
        """``request`` left for good (stop, length, abort), whether it was running or waiting."""
        ...

    def observe(self, load: SchedulerLoad) -> None:
        """Called once per step before anything else; most policies ignore it."""

    def metrics(self) -> dict[str, float]:
        """Numbers worth exporting (e.g. a predictor's Kendall tau), keyed by a metric-name suffix."""
        return {}


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: arrival order everywhere; the latest arrival is preempted first."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        # Preempted requests arrived before anything still waiting, so they go first.
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Request:
        return self._queue.popleft()

    def num_waiting(self) -> int:
        return len(self._queue)

    def waiting(self) -> Iterable[Request]:
        return iter(self._queue)

    def order_running(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=lambda r: r.arrival_time)

    def victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: r.arrival_time)

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        return []  # arrival order: nothing that waits outranks what already runs

    def on_finish(self, request: Request) -> None:
        pass


def make_policy(name: str, **options: object) -> SchedulingPolicy:
    """The policy called ``name``; ``options`` are its knobs (see ``scheduler.policies.build``)."""
    # Imported here: the policies import this module for FCFSPolicy.
    from conveyor.scheduler.policies import build

    return build(name, **options)
