"""Shortest job first (``sjf``) and shortest remaining time first (``srtf``) on predicted lengths.

Rank. A prediction is a median, not a length: the online ``LengthPredictor`` is off by a
lognormal factor whose spread ``sigma`` (the RMS of log(actual / predicted)) the policy measures
from its own finishes. A request's rank is its Gittins index under that belief (the expected
tokens it takes per chance of finishing, in tokens; lower runs first), which is what minimises
mean latency when sizes are only known as distributions. Waiting requests rank by their
prediction (``~1.3 * median`` at sigma 0.75). A running request's rank dips while it nears its
prediction (it is likely to finish soon, so it is not preempted), and grows once it has clearly
outlived it (it is probably one of the long ones after all), so a fresh short request may take its
slot. With exact predictions (sigma ~0) the rank is the remaining tokens: textbook SRTF. (Taking
"remaining = predicted - generated" literally instead protects every request that outlived its
prediction, half of them, and cost ~0.1 of the mean-latency gain.)

Aging. Reordering must not starve the long requests, but a long request's wait is only "too long"
relative to what arrival order would have given it. So each request gets a deadline in finished
work: at arrival, ``work_ahead`` is the predicted remaining tokens of every request already in the
system, i.e. what FCFS would finish before starting it; once the engine has finished
``wait_factor * work_ahead + wait_slack_jobs * mean length`` tokens since then, the request is
promoted: ahead of every unpromoted request, earliest deadline first, never preempted. Its wait is
then bounded by a multiple of its FCFS wait plus a slack, whatever the load, the hardware speed or
the number of sequences (the thing an age in seconds cannot know). The slack leaves requests that
arrive into a quiet engine to the ranking: FCFS would serve them quickly anyway, so promoting them
would cost the mean without helping the tail.

``sjf`` orders the waiting queue only; running requests keep arrival order and are never
preempted for an arrival. ``srtf`` also re-ranks running requests every step and preempts one for
a waiter that is promoted, or whose rank is ``preempt_ratio`` times smaller (the margin is the
hysteresis that keeps two similar requests from swapping every step). Recompute preemption keeps
the generated tokens, so a preempted request loses only a prefill.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections import deque
from collections.abc import Iterator

from conveyor.scheduler.length_predictor import LengthPredictor
from conveyor.scheduler.policies.base import SchedulingPolicy
from conveyor.scheduler.request import FinishReason, Request

Key = tuple[int, float, float]


@functools.cache
def gittins_ranks(sigma: float, points: int = 161, span: float = 5.0) -> tuple[list[float], list[float], float]:
    """Gittins ranks of a lognormal size with median 1 and log-spread ``sigma``.

    Returns (grid of attained sizes x, rank at each x, rank at x = 0), where
    rank(x) = min over y > x of E[min(S, y) - x | S > x] / P(S <= y | S > x). Cached per sigma,
    which callers round, so a run builds a handful of tables (a few ms each).
    """
    logs = [sigma * span * (2 * i / (points - 1) - 1) for i in range(points)]
    t = [math.exp(v) for v in logs]
    cdf = [0.5 * (1 + math.erf(v / (sigma * math.sqrt(2)))) for v in logs]
    # integral of the survival function from 0 to t[i]: ~t[0] below the grid, then trapezoids
    surv = [t[0]]
    for i in range(1, points):
        surv.append(surv[-1] + (t[i] - t[i - 1]) * (2 - cdf[i] - cdf[i - 1]) / 2)

    def rank(i0: int, base_int: float, base_cdf: float) -> float:
        best = math.inf
        for j in range(i0, points):
            if cdf[j] - base_cdf > 1e-12:
                best = min(best, (surv[j] - base_int) / (cdf[j] - base_cdf))
        return best

    ranks = [rank(i + 1, surv[i], cdf[i]) for i in range(points - 1)]
    return t[: points - 1], ranks, rank(0, 0.0, 0.0)


class SJFPolicy(SchedulingPolicy):
    name = "sjf"
    preemptive = False

    def __init__(self, predictor: LengthPredictor | None = None, *, wait_factor: float = 1.25,
                 wait_slack_jobs: float = 30.0, preempt_ratio: float = 1.3, prior_sigma: float = 0.75,
                 sigma_window: int = 256, min_sigma_samples: int = 20) -> None:
        self.predictor = predictor or LengthPredictor()
        self.wait_factor = wait_factor
        self.wait_slack_jobs = wait_slack_jobs
        self.preempt_ratio = preempt_ratio
        self.prior_sigma = prior_sigma
        self.min_sigma_samples = min_sigma_samples
        self._queue: list[Request] = []  # unsorted: ranks change as work finishes, so order is found at peek
        self._predicted: dict[str, float] = {}
        self._live: dict[str, Request] = {}  # added and not finished: waiting or running
        self._deadline: dict[str, float] = {}  # request -> finished tokens at which it is promoted
        self._log_errors: deque[float] = deque(maxlen=sigma_window)  # log(actual / predicted), recent finishes
        self.finished_tokens = 0  # output tokens of every finished request: the aging clock
        self.num_finished = 0
        self._sigma = round(prior_sigma, 2)

    # -- ranks ----------------------------------------------------------------------------
    def predicted_length(self, r: Request) -> float:
        # Lazily, for requests admitted under another policy (adaptive switches policies).
        if r.request_id not in self._predicted:
            self._predicted[r.request_id] = self.predictor.predict(r)
        return self._predicted[r.request_id]

    def sigma(self) -> float:
        """Measured spread of the predictor's log error (rounded: one rank table per 0.01); the prior
        until enough finishes. Updated at finishes only: ranks are read many times per step."""
        return self._sigma

    def predicted_remaining(self, r: Request) -> float:
        """The Gittins rank in tokens (see the module docstring)."""
        median = self.predicted_length(r)
        done = r.num_launched_outputs
        sigma = self._sigma
        if sigma < 0.05:  # predictions are (nearly) exact: remaining tokens
            return max(1.0, median - done)
        grid, ranks, rank0 = gittins_ranks(sigma)
        x = done / median
        if x < grid[0]:
            return median * rank0
        i = bisect.bisect_left(grid, x)
        if i >= len(grid):  # far beyond the prediction: the rank keeps growing with what it has done
            return median * ranks[-1] * x / grid[-1]
        return median * ranks[i]

    def is_promoted(self, r: Request) -> bool:
        return self.finished_tokens >= self._deadline.get(r.request_id, math.inf)

    def _key(self, r: Request) -> Key:
        if self.is_promoted(r):
            return 0, self._deadline[r.request_id], r.arrival_time
        return 1, self.predicted_remaining(r), r.arrival_time

    def score(self, r: Request) -> float:
        """The rank, 0 once promoted (lower runs first)."""
        return 0.0 if self.is_promoted(r) else self.predicted_remaining(r)

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.predicted_length(request)
        if request.request_id not in self._deadline:
            ahead = sum(self.predicted_remaining(r) for r in self._live.values())
            mean_len = self.finished_tokens / self.num_finished if self.num_finished else self.predicted_length(request)
            self._deadline[request.request_id] = (self.finished_tokens + self.wait_factor * ahead
                                                  + self.wait_slack_jobs * mean_len)
        self._live[request.request_id] = request
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.append(request)  # its deadline stands: preemption does not reset its wait

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def peek(self) -> Request | None:
        return min(self._queue, key=self._key) if self._queue else None

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "pop from an empty queue"
        self._queue.remove(head)
        return head

    def num_waiting(self) -> int:
        return len(self._queue)

    def waiting(self) -> Iterator[Request]:
        return iter(sorted(self._queue, key=self._key))

    # -- running --------------------------------------------------------------------------
    def order_running(self, running: list[Request]) -> list[Request]:
        if not self.preemptive:
            return sorted(running, key=lambda r: r.arrival_time)
        return sorted(running, key=self._key)

    def victim(self, candidates: list[Request]) -> Request:
        # The most remaining work loses its KV: it would hold memory longest anyway.
        return max(candidates, key=self._key)

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        if not self.preemptive:
            return []
        runners = sorted((r for r in running if r.remaining_new_tokens > 0 and not self.is_promoted(r)),
                         key=self._key, reverse=True)
        victims: list[Request] = []
        for waiter, runner in zip(itertools.islice(self.waiting(), len(runners)), runners):
            if not self.is_promoted(waiter) and \
                    self.predicted_remaining(waiter) * self.preempt_ratio >= self.predicted_remaining(runner):
                break
            victims.append(runner)
        return victims

    def on_finish(self, request: Request) -> None:
        rid = request.request_id
        predicted = self._predicted.pop(rid, None)
        self._live.pop(rid, None)
        self._deadline.pop(rid, None)
        n = len(request.output_token_ids)
        self.finished_tokens += n
        self.num_finished += 1
        # An abort's length says nothing about how long the answer would have been.
        if request.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            if predicted is not None:
                self._log_errors.append(math.log1p(n) - math.log1p(predicted))
                if len(self._log_errors) >= self.min_sigma_samples:
                    self._sigma = round(math.sqrt(sum(e * e for e in self._log_errors) / len(self._log_errors)), 2)
            self.predictor.observe(request, n, predicted)

    def metrics(self) -> dict[str, float]:
        return self.predictor.metrics()


class SRTFPolicy(SJFPolicy):
    name = "srtf"
    preemptive = True
