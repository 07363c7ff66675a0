"""Round robin across named queues (one per tenant) with a time slice counted in steps.

The queue whose turn it is gets the step's token budget first and the next free slot; after
``time_slice`` steps the turn passes to the next queue that has work. It is work-conserving:
when the current queue has nothing waiting, the next queues in ring order fill free slots.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from conveyor.scheduler.policies.base import SchedulingPolicy
from conveyor.scheduler.policies.fair import tenant_of
from conveyor.scheduler.request import Request


class RoundRobinPolicy(SchedulingPolicy):
    name = "round-robin"

    def __init__(self, time_slice: int = 8) -> None:
        if time_slice < 1:
            raise ValueError("time_slice must be >= 1 step")
        self.time_slice = time_slice
        self._queues: dict[str, deque[Request]] = {}  # insertion order is the ring order
        self._ring: list[str] = []
        self._turn = 0  # index into _ring
        self._steps_in_turn = 0
        self._running_tenants: dict[str, int] = {}
        self._admitted: set[str] = set()

    @property
    def current(self) -> str | None:
        return self._ring[self._turn] if self._ring else None

    def _ring_distance(self, tenant: str) -> int:
        """0 for the queue whose turn it is, then 1, 2, ... in ring order."""
        return (self._ring.index(tenant) - self._turn) % len(self._ring)

    def _has_work(self, tenant: str) -> bool:
        return bool(self._queues[tenant]) or self._running_tenants.get(tenant, 0) > 0

    def _tick(self) -> None:
        """One step passed: pass the turn on when the slice is used up (or the queue ran dry)."""
        if not self._ring:
            return
        self._steps_in_turn += 1
        if self._steps_in_turn < self.time_slice and self._has_work(self._ring[self._turn]):
            return
        self._steps_in_turn = 0
        for d in range(1, len(self._ring) + 1):
            nxt = (self._turn + d) % len(self._ring)
            if self._has_work(self._ring[nxt]):
                self._turn = nxt
                return

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        t = tenant_of(request)
        if t not in self._queues:
            self._queues[t] = deque()
            self._ring.append(t)
        self._queues[t].append(request)

    def requeue(self, request: Request) -> None:
        self._release(request)
        self._queues[tenant_of(request)].appendleft(request)

    def remove(self, request: Request) -> None:
        self._queues[tenant_of(request)].remove(request)

    def peek(self) -> Request | None:
        for t in sorted(self._ring, key=self._ring_distance):
            if self._queues[t]:
                return self._queues[t][0]
        return None

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "pop from an empty queue"
        t = tenant_of(head)
        self._queues[t].popleft()
        self._running_tenants[t] = self._running_tenants.get(t, 0) + 1
        self._admitted.add(head.request_id)
        return head

    def num_waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def waiting(self) -> Iterator[Request]:
        return (r for t in sorted(self._ring, key=self._ring_distance) for r in self._queues[t])

    # -- running --------------------------------------------------------------------------
    def order_running(self, running: list[Request]) -> list[Request]:
        self._tick()  # the scheduler asks exactly once per step
        return sorted(running, key=lambda r: (self._ring_distance(tenant_of(r)), r.arrival_time))

    def victim(self, candidates: list[Request]) -> Request:
        # The queue whose turn is furthest away loses first: it would wait longest anyway.
        return max(candidates, key=lambda r: (self._ring_distance(tenant_of(r)), r.arrival_time))

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        return []

    def on_finish(self, request: Request) -> None:
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.request_id in self._admitted:
            self._admitted.discard(request.request_id)
            self._running_tenants[tenant_of(request)] -= 1
