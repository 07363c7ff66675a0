"""Adaptive: switches among fcfs, srtf, sjf and priority by measured load, with hysteresis.

Signals, read in ``observe`` at the start of every step:
- queue pressure: waiting requests per sequence slot, *projected* ``horizon_s`` ahead with the
  queue's drift (arrivals counted in ``add`` minus admissions counted in ``pop``, both per second
  over the last ``window_s`` of the scheduler clock), so a rising rate shows before the queue is
  long and a draining queue lets go sooner;
- growth: arrivals outpacing admissions by ``overload_ratio`` means capacity is not keeping up;
- KV usage: the fraction of pages held.
Rules, in order:
- mixed priorities among the last ``priority_window`` arrivals -> ``priority`` (the caller said
  what matters). A window of arrivals, not the requests present now, because the latter flips
  whenever the one urgent request finishes;
- overloaded: pressure >= ``overload_queue``, or half that while the queue grows, or KV usage
  >= ``high_kv`` -> ``sjf``: short jobs first, but no preemption, because recomputing a
  preempted request spends capacity that an overloaded engine does not have;
- a queue: pressure >= ``high_queue`` -> ``srtf``: with capacity to spare, preempting a long
  runner for a short waiter cuts mean latency for the price of some recompute;
- calm: pressure <= ``low_queue`` and KV usage <= ``low_kv`` -> ``fcfs`` (nothing waits long;
  arrival order is the most predictable and costs nothing);
- otherwise (the hysteresis bands) the current policy stays; sjf is left (for srtf, or fcfs
  when calm) only once pressure is back under half of ``overload_queue``.
A new choice must also hold for ``dwell_s`` seconds (``calm_dwell_s`` to go back to fcfs) before it
is taken, so a burst or a lull shorter than that does not flap the policy. Every switch is logged (``conveyor.policy``) and counted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

import structlog

from conveyor.scheduler.length_predictor import LengthPredictor
from conveyor.scheduler.policies.base import SchedulerLoad, SchedulingPolicy
from conveyor.scheduler.policies.fcfs import FCFSPolicy
from conveyor.scheduler.policies.priority import PriorityPolicy
from conveyor.scheduler.policies.sjf import SJFPolicy
from conveyor.scheduler.request import Request

log = structlog.get_logger("conveyor.policy")
Clock = Callable[[], float]
CHOICES = ("fcfs", "srtf", "sjf", "priority")


class RateMeter:
    """Events per second over the last ``window_s`` seconds of the scheduler clock."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._pending = 0  # counted since the last advance
        self._events: deque[tuple[float, int]] = deque()  # (time, count) within the window
        self._total = 0
        self._start: float | None = None
        self._last = 0.0

    def count(self, n: int = 1) -> None:
        self._pending += n

    def advance(self, now: float) -> None:
        if self._start is None:
            self._start = now
        self._last = now
        if self._pending:
            self._events.append((now, self._pending))
            self._total += self._pending
            self._pending = 0
        while self._events and self._events[0][0] <= now - self.window_s:
            self._total -= self._events.popleft()[1]

    @property
    def full(self) -> bool:
        """Whether a whole window has been seen."""
        return self._start is not None and self._last - self._start >= self.window_s

    def rate(self, now: float) -> float:
        # Over the time actually seen: a meter started 1 s ago must not divide by the whole window.
        span = min(self.window_s, now - self._start) if self._start is not None else 0.0
        return self._total / span if span > 0 else 0.0


class LoadSignals(NamedTuple):
    queue_pressure: float  # projected waiting requests per slot
    kv_usage: float
    arrival_rate: float  # requests per second
    admission_rate: float


class AdaptivePolicy(SchedulingPolicy):
    name = "adaptive"

    def __init__(self, aging_s: float = 30.0, clock: Clock = time.monotonic, *, low_queue: float = 0.0625,
                 high_queue: float = 0.25, overload_queue: float = 4.0, overload_ratio: float = 1.05,
                 low_kv: float = 0.7, high_kv: float = 0.9, dwell_s: float = 1.0, calm_dwell_s: float = 10.0,
                 window_s: float = 20.0, horizon_s: float = 1.0, priority_window: int = 64) -> None:
        if not (low_queue < high_queue < overload_queue and low_kv < high_kv):
            raise ValueError("thresholds must rise: low < high (< overload), the hysteresis bands")
        self.low_queue, self.high_queue, self.overload_queue = low_queue, high_queue, overload_queue
        self.overload_ratio, self.low_kv, self.high_kv = overload_ratio, low_kv, high_kv
        self.dwell_s, self.calm_dwell_s, self.horizon_s = dwell_s, calm_dwell_s, horizon_s
        self.clock = clock
        self.predictor = LengthPredictor()
        # sjf and srtf are one policy in two modes: switching between them moves nothing and the
        # predictions made at arrival (what the reported tau compares) stay with the requests.
        self._sjf = SJFPolicy(self.predictor)
        self.policies: dict[str, SchedulingPolicy] = {
            "fcfs": FCFSPolicy(), "srtf": self._sjf, "sjf": self._sjf, "priority": PriorityPolicy(aging_s, clock),
        }
        self.active = "fcfs"
        self._candidate: str | None = None
        self._candidate_since = 0.0
        self.switches: list[tuple[float, str, str]] = []  # (time, from, to)
        self._recent_priorities: deque[int] = deque(maxlen=priority_window)
        self._arrivals = RateMeter(window_s)
        self._admissions = RateMeter(window_s)
        self.signals = LoadSignals(0.0, 0.0, 0.0, 0.0)

    @property
    def policy(self) -> SchedulingPolicy:
        return self.policies[self.active]

    # -- load and the choice ----------------------------------------------------------------
    def measure(self, load: SchedulerLoad) -> LoadSignals:
        self._arrivals.advance(load.now)
        self._admissions.advance(load.now)
        arrivals, admissions = self._arrivals.rate(load.now), self._admissions.rate(load.now)
        projected = max(0.0, load.num_waiting + (arrivals - admissions) * self.horizon_s)
        slots = max(1, load.num_running + load.free_slots)
        return LoadSignals(projected / slots, load.kv_usage, arrivals, admissions)

    def choose(self, s: LoadSignals) -> str:
        if len(set(self._recent_priorities)) > 1:
            return "priority"
        # Growth needs a full window: over a few seconds, arrival and admission counts are noise.
        growing = self._arrivals.full and s.arrival_rate > self.overload_ratio * s.admission_rate
        if s.kv_usage >= self.high_kv or s.queue_pressure >= self.overload_queue or \
                (growing and s.queue_pressure >= self.overload_queue / 2):
            return "sjf"
        if self.active == "sjf" and s.queue_pressure >= self.overload_queue / 2:
            return "sjf"  # the overload band: leave only once the queue has halved
        if s.queue_pressure <= self.low_queue and s.kv_usage <= self.low_kv:
            return "fcfs"
        if s.queue_pressure >= self.high_queue or self.active == "sjf":
            return "srtf"
        return self.active  # the band between calm and a queue: stay

    def observe(self, load: SchedulerLoad) -> None:
        self.signals = self.measure(load)
        choice = self.choose(self.signals)
        if choice == self.active:
            self._candidate = None
        elif choice != self._candidate:
            self._candidate, self._candidate_since = choice, load.now
        elif load.now - self._candidate_since >= self._dwell(choice):
            self._switch(choice, load.now)

    def _dwell(self, to: str) -> float:
        # Escalate fast, calm down slowly (as autoscalers do): a queue left in fcfs order costs
        # latency at once, while staying in srtf/sjf a while after the queue is gone costs
        # nothing, since with nothing waiting they order the running requests as fcfs would.
        return self.calm_dwell_s if to == "fcfs" else self.dwell_s

    def _switch(self, to: str, now: float) -> None:
        old, new = self.policy, self.policies[to]
        moved = list(old.waiting()) if new is not old else []
        for r in moved:
            old.remove(r)
            new.add(r)
        self._sjf.preemptive = to == "srtf"
        s = self.signals
        log.info("schedule policy switch", old=self.active, new=to, waiting=len(moved),
                 queue_pressure=round(s.queue_pressure, 3), kv_usage=round(s.kv_usage, 3),
                 arrival_rate=round(s.arrival_rate, 3), admission_rate=round(s.admission_rate, 3))
        self.switches.append((now, self.active, to))
        self.active, self._candidate = to, None

    def metrics(self) -> dict[str, float]:
        return {
            **self.predictor.metrics(),
            "adaptive_policy_switches": len(self.switches),
            "adaptive_active_policy": CHOICES.index(self.active),  # 0 fcfs, 1 srtf, 2 sjf, 3 priority
            "adaptive_queue_pressure": self.signals.queue_pressure,
            "adaptive_arrival_rate": self.signals.arrival_rate,
        }

    # -- delegated ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self._recent_priorities.append(request.priority)
        self._arrivals.count()
        self._sjf.predicted_length(request)  # predicted at arrival whatever is active: tau compares these
        self.policy.add(request)

    def requeue(self, request: Request) -> None:
        self.policy.requeue(request)

    def remove(self, request: Request) -> None:
        self.policy.remove(request)

    def peek(self) -> Request | None:
        return self.policy.peek()

    def pop(self) -> Request:
        r = self.policy.pop()
        if r.num_preemptions == 0:  # drift is about new work: a recompute was never counted as arriving
            self._admissions.count()
        return r

    def num_waiting(self) -> int:
        return self.policy.num_waiting()

    def waiting(self) -> Iterable[Request]:
        return self.policy.waiting()

    def order_running(self, running: list[Request]) -> list[Request]:
        return self.policy.order_running(running)

    def victim(self, candidates: list[Request]) -> Request:
        return self.policy.victim(candidates)

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        return self.policy.preempt_for_waiting(running)

    def on_finish(self, request: Request) -> None:
        # The predictor learns whichever policy is active, so sjf/srtf are ready when load rises.
        self._sjf.on_finish(request)
