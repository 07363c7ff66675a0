"""Adaptive: switches among fcfs, sjf and priority by measured load, with hysteresis.

Rules, from the load seen each step (waiting requests per running one) and the recent
arrivals (whether the last ``priority_window`` carried more than one priority level):
- mixed priorities arriving -> ``priority`` (the caller said what matters; honour it). A window
  of arrivals, not the requests present now, because the latter flips whenever the one urgent
  request finishes;
- otherwise queue pressure at or above ``high_load`` -> ``sjf`` (under overload, short jobs
  first minimise mean latency);
- pressure at or below ``low_load`` -> ``fcfs`` (nothing waits long; keep arrival order).
Between the two thresholds the current policy stays (hysteresis band), and a new choice must
hold for ``patience`` consecutive steps before it is taken, so the policy does not flap.
Every switch is logged and kept in ``switches``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

import structlog

from scheduler.length_predictor import LengthPredictor
from scheduler.policies.priority import PriorityPolicy
from scheduler.policies.sjf import SJFPolicy
from scheduler.policy import FCFSPolicy, SchedulingPolicy
from scheduler.request import Request

log = structlog.get_logger("conveyor.scheduler")
Clock = Callable[[], float]


class AdaptivePolicy(SchedulingPolicy):
    name = "adaptive"

    def __init__(self, aging_s: float = 30.0, clock: Clock = time.monotonic, low_load: float = 0.25,
                 high_load: float = 1.0, patience: int = 8, priority_window: int = 64) -> None:
        if not low_load < high_load:
            raise ValueError("low_load must be below high_load (the hysteresis band)")
        self.low_load, self.high_load, self.patience = low_load, high_load, patience
        self.clock = clock
        self.predictor = LengthPredictor()
        self.policies: dict[str, SchedulingPolicy] = {
            "fcfs": FCFSPolicy(),
            "sjf": SJFPolicy(self.predictor, aging_s, clock),
            "priority": PriorityPolicy(aging_s, clock),
        }
        self.active = "fcfs"
        self._candidate = "fcfs"
        self._streak = 0
        self.switches: list[tuple[float, str, str]] = []  # (time, from, to)
        self._recent_priorities: deque[int] = deque(maxlen=priority_window)

    @property
    def policy(self) -> SchedulingPolicy:
        return self.policies[self.active]

    def _choose(self, running: list[Request]) -> str:
        if len(set(self._recent_priorities)) > 1:
            return "priority"
        pressure = self.policy.num_waiting() / max(1, len(running))
        if pressure >= self.high_load:
            return "sjf"
        if pressure <= self.low_load:
            return "fcfs"
        return self.active

    def _observe(self, running: list[Request]) -> None:
        choice = self._choose(running)
        if choice == self.active:
            self._streak = 0
            return
        self._streak = self._streak + 1 if choice == self._candidate else 1
        self._candidate = choice
        if self._streak >= self.patience:
            self._switch(choice, len(running))

    def _switch(self, to: str, num_running: int) -> None:
        old, new = self.policy, self.policies[to]
        moved = list(old.waiting())
        for r in moved:
            old.remove(r)
            new.add(r)
        log.info("schedule policy switch", old=self.active, new=to, waiting=len(moved), running=num_running)
        self.switches.append((self.clock(), self.active, to))
        self.active, self._streak = to, 0

    # -- delegated ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self._recent_priorities.append(request.priority)
        self.policy.add(request)

    def requeue(self, request: Request) -> None:
        self.policy.requeue(request)

    def remove(self, request: Request) -> None:
        self.policy.remove(request)

    def peek(self) -> Request | None:
        return self.policy.peek()

    def pop(self) -> Request:
        return self.policy.pop()

    def num_waiting(self) -> int:
        return self.policy.num_waiting()

    def waiting(self) -> Iterable[Request]:
        return self.policy.waiting()

    def order_running(self, running: list[Request]) -> list[Request]:
        self._observe(running)  # asked once per step: the load is measured here
        return self.policy.order_running(running)

    def victim(self, candidates: list[Request]) -> Request:
        return self.policy.victim(candidates)

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        return self.policy.preempt_for_waiting(running)

    def on_finish(self, request: Request) -> None:
        # The predictor learns whichever policy is active, so sjf is ready when load rises.
        self.policies["sjf"].on_finish(request)
