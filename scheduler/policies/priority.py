"""Strict priority levels (lower value = more urgent, as in vLLM), FCFS inside a level, with aging.

Aging: the request at the head of a level gets one level more urgent per ``aging_s`` seconds
since it became the head, so a stream of urgent arrivals cannot starve a lower level: its head
competes with them after ``aging_s`` per level of difference, then the next one does.
Only heads age, and only from when they reached the head, because aging is against starvation
*by more urgent levels*: a level's own backlog (low-priority load beyond capacity) must not age
its requests past fresh urgent ones, or an overload of background work would take the urgent
traffic's slots with it. Running requests age from their admission, which makes a request that
has run a long time progressively harder to preempt: preemption by arrivals is bounded.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterator

from conveyor.scheduler.policies.base import SchedulingPolicy
from conveyor.scheduler.request import Request, RequestStatus

Clock = Callable[[], float]


class PriorityPolicy(SchedulingPolicy):
    name = "priority"

    def __init__(self, aging_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.aging_s = aging_s
        self.clock = clock
        # One arrival-sorted list per priority level: only a level's head ages, so it is the most
        # urgent request of its level whatever the time, and peek looks at heads only.
        self._levels: dict[int, list[Request]] = {}
        self._head_since: dict[int, float] = {}  # level -> when its current head became the head
        self._started: dict[str, float] = {}  # request id -> admission time, while running

    # -- urgency --------------------------------------------------------------------------
    def _aging_start(self, r: Request) -> float | None:
        """When ``r`` started aging: as a level's head, or when admitted; None if it does not age."""
        if r.status is RequestStatus.WAITING:
            level = self._levels.get(r.priority)
            return self._head_since[r.priority] if level and level[0] is r else None
        # Running (or admitted under another policy, which adaptive does): from admission.
        return self._started.get(r.request_id, r.arrival_time)

    def effective_priority(self, r: Request, now: float | None = None) -> int:
        if self.aging_s <= 0:
            return r.priority
        start = self._aging_start(r)
        if start is None:
            return r.priority
        now = self.clock() if now is None else now
        return r.priority - int(max(0.0, now - start) // self.aging_s)

    def _new_head(self, priority: int, head: Request | None) -> None:
        if head is None:
            self._head_since.pop(priority, None)
        else:
            self._head_since[priority] = self.clock()

    def _key(self, r: Request, now: float) -> tuple[int, float]:
        return self.effective_priority(r, now), r.arrival_time

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        level = self._levels.setdefault(request.priority, [])
        head = level[0] if level else None
        bisect.insort(level, request, key=lambda r: r.arrival_time)
        if level[0] is not head:
            self._new_head(request.priority, level[0])

    def requeue(self, request: Request) -> None:
        # Arrival order inside the level puts a preempted request back ahead of later arrivals.
        self._started.pop(request.request_id, None)
        self.add(request)

    def remove(self, request: Request) -> None:
        level = self._levels[request.priority]
        was_head = level[0] is request
        level.remove(request)
        if not level:
            del self._levels[request.priority]
        if was_head:
            self._new_head(request.priority, level[0] if level else None)

    def peek(self) -> Request | None:
        if not self._levels:
            return None
        now = self.clock()
        return min((level[0] for level in self._levels.values()), key=lambda r: self._key(r, now))

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "pop from an empty queue"
        self.remove(head)
        self._started[head.request_id] = self.clock()
        return head

    def num_waiting(self) -> int:
        return sum(len(level) for level in self._levels.values())

    def waiting(self) -> Iterator[Request]:
        now = self.clock()
        return iter(sorted((r for level in self._levels.values() for r in level), key=lambda r: self._key(r, now)))

    # -- running --------------------------------------------------------------------------
    def order_running(self, running: list[Request]) -> list[Request]:
        now = self.clock()
        return sorted(running, key=lambda r: self._key(r, now))

    def victim(self, candidates: list[Request]) -> Request:
        now = self.clock()
        return max(candidates, key=lambda r: self._key(r, now))

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        """Pair the most urgent waiters with the least urgent runners; preempt while the waiter is
        strictly more urgent. Strictness (and aging of the runner) keeps two requests from
        trading places every step."""
        now = self.clock()
        # A request whose last token is in flight is about to finish by length: preempting it
        # would throw its work away to free a slot that frees itself.
        runners = sorted((r for r in running if r.remaining_new_tokens > 0), key=lambda r: self._key(r, now),
                         reverse=True)
        victims: list[Request] = []
        for waiter, runner in zip(itertools.islice(self.waiting(), len(runners)), runners):
            if self.effective_priority(waiter, now) >= self.effective_priority(runner, now):
                break
            victims.append(runner)
        return victims

    def on_finish(self, request: Request) -> None:
        self._started.pop(request.request_id, None)

