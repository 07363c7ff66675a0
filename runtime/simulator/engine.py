"""The simulation: the real scheduler, policies and KV bookkeeping, stepped on simulated time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from conveyor.memory import KVCacheManager, make_reservation
from conveyor.runtime.simulator.cost_model import CostModel
from conveyor.runtime.simulator.workloads import SimRequest
from conveyor.scheduler import (
    FinishReason,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerLimits,
    make_policy,
)
from conveyor.scheduler.length_predictor import LengthPredictor


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The engine limits and policy knobs a simulation runs under (the engine flags' names)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    num_pages: int = 8192
    block_size: int = 16
    reservation: str = "dynamic"
    reservation_beta: float = 0.3
    reservation_adapt: bool = True
    enable_prefix_caching: bool = True
    priority_aging_s: float = 30.0
    static_batch_size: int = 8
    static_batch_timeout: float = 0.5
    round_robin_time_slice: int = 8
    cost: CostModel = CostModel()

    @property
    def limits(self) -> SchedulerLimits:
        return SchedulerLimits(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len)


DEFAULT_CONFIG = SimConfig()


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RequestStat(NamedTuple):
    arrival: float
    admitted: float
    ttft: float
    e2e: float
    tpot: float
    output_len: int
    prompt_len: int
    tenant: str
    priority: int


@dataclass
class SimResult:
    policy: str
    steps: int = 0
    sim_time_s: float = 0.0
    preemptions: int = 0
    requests: list[RequestStat] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the policy's metrics() at the end
    trace: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (time, metrics()) per trace tick
    shapes: list[tuple[int, int]] = field(default_factory=list)  # per step: (num_tokens, kv_tokens_read)


class TrueLengths(LengthPredictor):
    """A predictor that knows every drawn length: what sjf/srtf would reach with a perfect predictor,
    the ceiling a learned one is measured against. Only the simulator can build it."""

    def __init__(self, workload: Sequence[SimRequest]) -> None:
        super().__init__()
        self.lengths = {r.request_id: r.output_len for r in workload}

    def predict(self, request: Request) -> float:
        return float(self.lengths[request.request_id])


def simulate(policy_name: str, workload: Sequence[SimRequest], config: SimConfig = DEFAULT_CONFIG,
             trace_every_s: float | None = None, true_lengths: bool = False) -> SimResult:
    """Replay ``workload`` through the real scheduler; one loop turn is one engine step at depth 1.

    ``true_lengths``: sjf/srtf rank by the drawn lengths instead of learning them (``TrueLengths``).
    """
    clock = SimClock()
    policy = make_policy(policy_name, clock=clock, priority_aging_s=config.priority_aging_s,
                         static_batch_size=config.static_batch_size,
                         static_batch_timeout=config.static_batch_timeout,
                         round_robin_time_slice=config.round_robin_time_slice,
                         predictor=TrueLengths(workload) if true_lengths else None)
    kv = KVCacheManager(config.num_pages, config.block_size,
                        make_reservation(config.reservation, config.reservation_beta, config.reservation_adapt),
                        enable_prefix_caching=config.enable_prefix_caching)
    s = Scheduler(config.limits, policy, kv, clock=clock)
    cost = config.cost
    pending = sorted(workload, key=lambda r: r.arrival)
    target = {r.request_id: r.output_len for r in workload}
    live: list[Request] = []
    admitted: dict[str, float] = {}
    result = SimResult(policy_name)
    next_trace = 0.0
    i = 0
    while i < len(pending) or s.has_work():
        while i < len(pending) and pending[i].arrival <= clock.now:
            w = pending[i]
            req = Request(w.request_id, list(w.prompt), SamplingParams(max_tokens=w.max_new_tokens, ignore_eos=True),
                          w.max_new_tokens, arrival_time=w.arrival, priority=w.priority, tenant=w.tenant)
            live.append(req)
            s.add(req)
            i += 1
        if trace_every_s is not None and clock.now >= next_trace:
            result.trace.append((clock.now, policy.metrics()))
            next_trace = clock.now + trace_every_s
        batch = s.schedule()
        if batch is None:
            # Idle: jump to the next arrival. Work that cannot start yet (a static batch filling
            # up) lets simulated time pass in base-step ticks, as the engine's stall wait does.
            nxt = pending[i].arrival if i < len(pending) else math.inf
            clock.now = min(nxt, clock.now + cost.base_s) if s.has_work() else nxt
            continue
        for seq in batch.seqs:
            admitted.setdefault(seq.request.request_id, clock.now)
        shape = (batch.num_tokens, sum(q.kv_len for q in batch.seqs))  # as StepRecord counts them
        clock.now += cost.step_s(*shape, prefill=batch.num_prefill_tokens > 0)
        result.shapes.append(shape)
        result.steps += 1
        for seq in batch.seqs:
            r = seq.request
            if not seq.samples or r.is_finished or seq.epoch != r.num_preemptions:
                continue
            r.output_token_ids.append(0)
            if r.first_token_time is None:
                r.first_token_time = clock.now
            if len(r.output_token_ids) >= target[r.request_id]:
                s.finish(r, FinishReason.LENGTH if len(r.output_token_ids) >= r.max_new_tokens else FinishReason.STOP)
                r.finish_time = clock.now
        s.batch_done(batch)
    s.check_integrity()
    result.sim_time_s = clock.now
    result.preemptions = s.num_preemptions
    result.metrics = policy.metrics()
    for r in live:
        assert r.first_token_time is not None and r.finish_time is not None, r.request_id
        n = len(r.output_token_ids)
        result.requests.append(RequestStat(
            r.arrival_time, admitted[r.request_id], r.first_token_time - r.arrival_time,
            r.finish_time - r.arrival_time, (r.finish_time - r.first_token_time) / (n - 1) if n > 1 else 0.0,
            n, r.num_prompt_tokens, r.tenant or "", r.priority,
        ))
    return result


def measure_capacity(workload: Sequence[SimRequest], config: SimConfig = DEFAULT_CONFIG,
                     run: Callable[[str, Sequence[SimRequest], SimConfig], SimResult] = simulate) -> float:
    """Saturated throughput in requests/s: everything arrives at once, FCFS (which serves the mix as
    it comes), counted until the last request is admitted, so the drain at the end is left out.
    ``run`` is ``simulate`` or the real engine (runtime.simulator.real.RealRunner)."""
    res = run("fcfs", [dataclasses.replace(r, arrival=0.0) for r in workload], config)
    until = max(r.admitted for r in res.requests)
    done = sum(1 for r in res.requests if r.e2e <= until)
    return done / until if until > 0 else math.inf
