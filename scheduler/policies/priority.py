"""Strict priority levels (lower value = more urgent, as in vLLM), FCFS inside a level, with aging.

Aging: a request's effective priority improves by one level per ``aging_s`` seconds since it
arrived, so a stream of urgent arrivals cannot starve a low-priority request forever. Running
requests age too, which makes a request that has run a long time progressively harder to
preempt: preemption by arrivals is bounded.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterator

from scheduler.policy import SchedulingPolicy
from scheduler.request import Request

Clock = Callable[[], float]


class PriorityPolicy(SchedulingPolicy):
    name = "priority"

    def __init__(self, aging_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.aging_s = aging_s
        self.clock = clock
        # One arrival-sorted list per priority level: the most urgent request of a level is its
        # head whatever the time (aging is monotone in arrival time), so peek looks at heads only.
        self._levels: dict[int, list[Request]] = {}

    # -- urgency --------------------------------------------------------------------------
    def effective_priority(self, r: Request, now: float | None = None) -> int:
        if self.aging_s <= 0:
            return r.priority
        now = self.clock() if now is None else now
        return r.priority - int(max(0.0, now - r.arrival_time) // self.aging_s)

    def _key(self, r: Request, now: float) -> tuple[int, float]:
        return self.effective_priority(r, now), r.arrival_time

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        bisect.insort(self._levels.setdefault(request.priority, []), request, key=lambda r: r.arrival_time)

    def requeue(self, request: Request) -> None:
        # Arrival order inside the level puts a preempted request back ahead of later arrivals.
        self.add(request)

    def remove(self, request: Request) -> None:
        level = self._levels[request.priority]
        level.remove(request)
        if not level:
            del self._levels[request.priority]

    def peek(self) -> Request | None:
        if not self._levels:
            return None
        now = self.clock()
        return min((level[0] for level in self._levels.values()), key=lambda r: self._key(r, now))

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "pop from an empty queue"
        self.remove(head)
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
        pass

