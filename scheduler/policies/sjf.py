"""Shortest job first (``sjf``) and shortest remaining time first (``srtf``) on predicted lengths.

The score of a request is its predicted remaining output tokens, halved for every ``aging_s``
seconds since it arrived: ``remaining * 2 ** (-age / aging_s)`` (aging). The discount is
exponential on purpose: under overload the queued short jobs age too, and a merely
proportional discount (HRRN's) lets a growing backlog of them starve a long job forever.
Halving bounds it: a job that arrived more than ``aging_s * log2(long / short)`` seconds after a
long one can no longer overtake it. Predictions come from the online ``LengthPredictor``,
made once at arrival and learned from ``on_finish``.

``sjf`` orders the waiting queue only; running requests keep arrival order and are never
preempted for an arrival. ``srtf`` also re-ranks running requests every step by score and
preempts one for a waiter whose score is ``preempt_ratio`` times smaller (the margin is the
hysteresis that keeps two similar requests from swapping every step).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

from scheduler.length_predictor import LengthPredictor
from scheduler.policy import SchedulingPolicy
from scheduler.request import FinishReason, Request

Clock = Callable[[], float]


class SJFPolicy(SchedulingPolicy):
    name = "sjf"
    preemptive = False

    def __init__(self, predictor: LengthPredictor | None = None, aging_s: float = 30.0,
                 clock: Clock = time.monotonic, preempt_ratio: float = 2.0) -> None:
        self.predictor = predictor or LengthPredictor()
        self.aging_s = aging_s
        self.clock = clock
        self.preempt_ratio = preempt_ratio
        self._queue: list[Request] = []  # unsorted: scores change with time, so order is found at peek
        self._predicted: dict[str, float] = {}

    # -- scores ---------------------------------------------------------------------------
    def predicted_length(self, r: Request) -> float:
        # Lazily, for requests admitted under another policy (adaptive switches policies).
        if r.request_id not in self._predicted:
            self._predicted[r.request_id] = self.predictor.predict(r)
        return self._predicted[r.request_id]

    def predicted_remaining(self, r: Request) -> float:
        # Once a request outlives its prediction, it is treated as nearly done rather than as
        # negative work: it has the least left to lose and should not be preempted. (Treating it
        # as probably long instead, the lognormal mean residual life, measured worse under
        # overload: requests preempted late lose their progress and then wait out the aging.)
        return max(1.0, self.predicted_length(r) - r.num_launched_outputs)

    def score(self, r: Request, now: float) -> float:
        if self.aging_s <= 0:
            return self.predicted_remaining(r)
        age = max(0.0, now - r.arrival_time)
        return self.predicted_remaining(r) * 2.0 ** (-age / self.aging_s)

    def _key(self, r: Request, now: float) -> tuple[float, float]:
        return self.score(r, now), r.arrival_time

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.predicted_length(request)
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.append(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def peek(self) -> Request | None:
        if not self._queue:
            return None
        now = self.clock()
        return min(self._queue, key=lambda r: self._key(r, now))

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "pop from an empty queue"
        self._queue.remove(head)
        return head

    def num_waiting(self) -> int:
        return len(self._queue)

    def waiting(self) -> Iterator[Request]:
        now = self.clock()
        return iter(sorted(self._queue, key=lambda r: self._key(r, now)))

    # -- running --------------------------------------------------------------------------
    def order_running(self, running: list[Request]) -> list[Request]:
        if not self.preemptive:
            return sorted(running, key=lambda r: r.arrival_time)
        now = self.clock()
        return sorted(running, key=lambda r: self._key(r, now))

    def victim(self, candidates: list[Request]) -> Request:
        # The most remaining work loses its KV: it would hold memory longest anyway.
        now = self.clock()
        return max(candidates, key=lambda r: self._key(r, now))

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        if not self.preemptive:
            return []
        now = self.clock()
        runners = sorted((r for r in running if r.remaining_new_tokens > 0), key=lambda r: self._key(r, now),
                         reverse=True)
        victims: list[Request] = []
        for waiter, runner in zip(itertools.islice(self.waiting(), len(runners)), runners):
            if self.score(waiter, now) * self.preempt_ratio >= self.score(runner, now):
                break
            victims.append(runner)
        return victims

    def on_finish(self, request: Request) -> None:
        predicted = self._predicted.pop(request.request_id, None)
        # An abort's length says nothing about how long the answer would have been.
        if request.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.predictor.observe(request, len(request.output_token_ids), predicted)

    def metrics(self) -> dict[str, float]:
        return self.predictor.metrics()


class SRTFPolicy(SJFPolicy):
    name = "srtf"
    preemptive = True
