"""The simulation: the real engine (scheduler, policies, KV bookkeeping) stepped on simulated time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine.core import EngineCore, ModelInfo
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.runtime.tools.driver import replay
from conveyor.runtime.tools.simulator.cost_model import CostModel
from conveyor.runtime.tools.simulator.executor import SIM_EOS, SimClock, SimulatedExecutor
from conveyor.runtime.tools.simulator.workloads import SimRequest
from conveyor.scheduler import Request, SamplingParams, make_policy
from conveyor.scheduler.length_predictor import LengthPredictor


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The engine limits and policy knobs a simulation runs under (the engine flags' names)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True  # off: a prompt runs whole in one step (the prefill-first baseline)
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

    def engine_config(self, policy: str) -> EngineConfig:
        """The engine flags this simulation stands for; depth 1, so one loop turn is one step."""
        return EngineConfig(
            model="simulated", max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
            block_size=self.block_size, schedule_policy=policy,
            reservation=self.reservation, reservation_beta=self.reservation_beta,
            reservation_adapt=self.reservation_adapt, enable_prefix_caching=self.enable_prefix_caching,
            priority_aging_s=self.priority_aging_s, static_batch_size=self.static_batch_size,
            static_batch_timeout=self.static_batch_timeout, round_robin_time_slice=self.round_robin_time_slice,
            pipeline_depth=1)


DEFAULT_CONFIG = SimConfig()


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
    cached: int = 0  # prompt tokens served from the prefix cache at first admission


@dataclass
class SimResult:
    policy: str
    steps: int = 0
    sim_time_s: float = 0.0
    preemptions: int = 0
    retractions: int = 0  # the preemptions forced by a dry KV pool (dynamic reservation's cost)
    requests: list[RequestStat] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the policy's metrics() at the end
    trace: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (time, metrics()) per trace tick
    shapes: list[tuple[int, int]] = field(default_factory=list)  # per step: (num_tokens, kv_tokens_read)
    # Every gap between two consecutive tokens of one request (time between tokens, TBT): P99 TBT is
    # the decode-stall SLO that capacity is measured under, and a mean TPOT hides the stalls.
    tbt: list[float] = field(default_factory=list)


class TokenGaps:
    """An ``after_step`` hook: the time between each request's consecutive tokens, read off ``clock``
    when the step that sampled them returns (at depth 1, when the token exists)."""

    def __init__(self, clock: Callable[[], float], limit: Mapping[str, int] | None = None) -> None:
        self.clock = clock
        self.limit = limit  # request id -> tokens that count (the real engine may compute one past it)
        self.last: dict[str, tuple[float, int]] = {}
        self.gaps: list[float] = []

    def __call__(self, outputs: list[RequestOutput]) -> None:
        now = self.clock()
        for out in outputs:
            n = out.num_output_tokens
            if self.limit is not None and n > self.limit[out.request_id]:
                continue
            prev = self.last.get(out.request_id)
            if prev is not None and n > prev[1]:
                self.gaps.append(now - prev[0])
            if prev is None or n > prev[1]:
                self.last[out.request_id] = (now, n)


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
    """Replay ``workload`` through the real engine (scheduler, policy, KV bookkeeping, output stage) at
    depth 1, with a ``SimulatedExecutor`` in place of the device: one step is one engine step.

    ``true_lengths``: sjf/srtf rank by the drawn lengths instead of learning them (``TrueLengths``).
    """
    clock = SimClock()
    policy = make_policy(policy_name, clock=clock, priority_aging_s=config.priority_aging_s,
                         static_batch_size=config.static_batch_size,
                         static_batch_timeout=config.static_batch_timeout,
                         round_robin_time_slice=config.round_robin_time_slice,
                         predictor=TrueLengths(workload) if true_lengths else None)
    lengths = {r.request_id: r.output_len for r in workload}
    executor = SimulatedExecutor(config.cost, clock, lengths, config.num_pages)
    model = ModelInfo("simulated", vocab_size=2, max_position_embeddings=config.max_model_len, eos_token_ids=(SIM_EOS,))
    core = EngineCore(config.engine_config(policy_name), executor, model, clock=clock, policy=policy)
    core.step_records = []
    result = SimResult(policy_name)
    next_trace = 0.0

    def make_request(w: SimRequest, t0: float) -> Request:
        return Request(w.request_id, list(w.prompt), SamplingParams(max_tokens=w.max_new_tokens),
                       w.max_new_tokens, arrival_time=t0 + w.arrival, priority=w.priority, tenant=w.tenant)

    def trace(elapsed: float) -> None:
        nonlocal next_trace
        if trace_every_s is not None and elapsed >= next_trace:
            result.trace.append((elapsed, policy.metrics()))
            next_trace = elapsed + trace_every_s

    gaps = TokenGaps(clock)
    live, _ = replay(core, workload, lambda w: w.arrival, make_request, clock=clock, stall_s=config.cost.base_s,
                     before_step=trace, after_step=gaps)
    core.check_integrity()
    result.steps = len(core.step_records)
    result.shapes = [(r.num_tokens, r.kv_tokens_read) for r in core.step_records]
    result.sim_time_s = clock.now
    result.preemptions = core.scheduler.num_preemptions
    result.retractions = core.scheduler.num_retractions
    result.tbt = gaps.gaps
    result.metrics = policy.metrics()
    for r in live:
        assert r.admit_time is not None and r.first_token_time is not None and r.finish_time is not None, r.request_id
        n = len(r.output_token_ids)
        result.requests.append(RequestStat(
            r.arrival_time, r.admit_time, r.first_token_time - r.arrival_time,
            r.finish_time - r.arrival_time, (r.finish_time - r.first_token_time) / (n - 1) if n > 1 else 0.0,
            n, r.num_prompt_tokens, r.tenant or "", r.priority, r.num_cached_tokens,
        ))
    return result


def measure_capacity(workload: Sequence[SimRequest], config: SimConfig = DEFAULT_CONFIG,
                     run: Callable[[str, Sequence[SimRequest], SimConfig], SimResult] = simulate) -> float:
    """Saturated throughput in requests/s: everything arrives at once, FCFS (which serves the mix as
    it comes), counted until the last request is admitted, so the drain at the end is left out.
    ``run`` is ``simulate`` or the real engine (runtime.tools.simulator.real.RealRunner)."""
    res = run("fcfs", [dataclasses.replace(r, arrival=0.0) for r in workload], config)
    until = max(r.admitted for r in res.requests)
    done = sum(1 for r in res.requests if r.e2e <= until)
    return done / until if until > 0 else math.inf
