"""Fair share between tenants with virtual token counters, in the spirit of VTC (Sheng et al., OSDI 2024).

Each tenant has a counter of the service it has received: ``input_weight`` per prompt token
(charged at admission, when its prefill is granted) plus ``output_weight`` per output token
(charged as lengths advance, seen every step in ``order_running``), divided by the tenant's
weight. The tenant with the smallest counter is served next, FCFS inside a tenant.

Counters are lifted on arrival, as in VTC: a tenant with nothing waiting starts at no less than
the smallest counter among the tenants that have requests waiting (or, if none does, among those
running), so service it did not ask for cannot be banked as credit and later spent starving
everyone else. "Nothing waiting" rather than "idle": a light tenant whose few requests are all
running is not backlogged either, and without the lift its counter would fall ever further
behind a heavy tenant's, a gap it could later cash in a burst.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

from conveyor.scheduler.policies.base import SchedulingPolicy
from conveyor.scheduler.request import Request


def tenant_of(r: Request) -> str:
    return r.tenant or ""


class FairSharePolicy(SchedulingPolicy):
    name = "fair"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0,
                 tenant_weights: Mapping[str, float] | None = None) -> None:
        # Output tokens cost more than input ones (decode is memory-bound, one token a step),
        # which is VTC's default weighting too.
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.tenant_weights = dict(tenant_weights or {})
        self.counters: dict[str, float] = {}
        self._queues: dict[str, deque[Request]] = {}
        self._running: dict[str, int] = {}  # tenant -> requests admitted and not finished/preempted
        self._charged_outputs: dict[str, int] = {}  # request id -> output tokens already charged
        self._admitted: set[str] = set()  # ids of requests that are running

    # -- counters -------------------------------------------------------------------------
    def _charge(self, tenant: str, tokens: float) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / self.tenant_weights.get(tenant, 1.0)

    def _is_active(self, tenant: str) -> bool:
        return bool(self._queues.get(tenant)) or self._running.get(tenant, 0) > 0

    def _charge_outputs(self, r: Request) -> None:
        done = r.num_launched_outputs
        before = self._charged_outputs.get(r.request_id, 0)
        if done > before:  # lengths drop on preemption (recompute); service is not charged twice
            self._charge(tenant_of(r), self.output_weight * (done - before))
            self._charged_outputs[r.request_id] = done

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        t = tenant_of(request)
        if not self._queues.get(t):
            others = [u for u in self.counters if u != t]
            reference = [self.counters[u] for u in others if self._queues.get(u)] or \
                [self.counters[u] for u in others if self._is_active(u)]
            if reference:
                self.counters[t] = max(self.counters.get(t, 0.0), min(reference))
        self.counters.setdefault(t, 0.0)
        self._queues.setdefault(t, deque()).append(request)

    def requeue(self, request: Request) -> None:
        t = tenant_of(request)
        self._running[t] -= 1
        self._admitted.discard(request.request_id)
        self._queues.setdefault(t, deque()).appendleft(request)

    def remove(self, request: Request) -> None:
        self._queues[tenant_of(request)].remove(request)

    def peek(self) -> Request | None:
        backlogged = [t for t, q in self._queues.items() if q]
        if not backlogged:
            return None
        t = min(backlogged, key=lambda u: (self.counters[u], self._queues[u][0].arrival_time))
        return self._queues[t][0]

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "pop from an empty queue"
        t = tenant_of(head)
        self._queues[t].popleft()
        self._running[t] = self._running.get(t, 0) + 1
        self._admitted.add(head.request_id)
        # The prompt is charged at admission (its prefill is granted now), which also keeps one
        # tenant from taking every free slot in a single step. A recompute is not charged again.
        if head.num_preemptions == 0:
            self._charge(t, self.input_weight * head.num_prompt_tokens)
        return head

    def num_waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def waiting(self) -> Iterator[Request]:
        return (r for q in self._queues.values() for r in q)

    # -- running --------------------------------------------------------------------------
    def order_running(self, running: list[Request]) -> list[Request]:
        for r in running:
            self._charge_outputs(r)
        return sorted(running, key=lambda r: (self.counters.get(tenant_of(r), 0.0), r.arrival_time))

    def victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: (self.counters.get(tenant_of(r), 0.0), r.arrival_time))

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        return []

    def on_finish(self, request: Request) -> None:
        if request.request_id in self._admitted:  # finished while running (not aborted while waiting)
            self._admitted.discard(request.request_id)
            self._running[tenant_of(request)] -= 1
        self._charge_outputs(request)
        self._charged_outputs.pop(request.request_id, None)

    def counter_gap(self) -> float:
        """Largest difference between the counters of tenants with work (waiting or running): what
        the lift on arrival and serving the smallest counter first keep bounded."""
        active = [c for t, c in list(self.counters.items()) if self._is_active(t)]
        return max(active) - min(active) if active else 0.0

    def metrics(self) -> dict[str, float]:
        active = sum(1 for t in list(self.counters) if self._is_active(t))
        return {"fair_counter_gap": self.counter_gap(), "fair_active_tenants": active}
