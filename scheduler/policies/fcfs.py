"""First come, first served: arrival order everywhere (the default, and the baseline of every comparison)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from conveyor.scheduler.policies.base import SchedulingPolicy
from conveyor.scheduler.request import Request


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
