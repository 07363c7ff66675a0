"""The scenarios on the real engine: the same workloads, replayed on the wall clock through ``EngineCore``
(real model forward, real scheduler and policy), summarised by the same code as the simulator.

``RealRunner`` stands in for ``simulate`` (and so, passed to ``measure_capacity``, measures capacity):
a scenario asks it to run a policy on a workload under a ``SimConfig`` (whose limits and KV pool size
become the engine's) and gets a ``SimResult`` back. What differs from the simulator, on purpose:

- Time is wall time. Capacity is measured on the engine too, the simulator's way (everything queued at
  t = 0, fcfs, requests finished by the last admission over the time it took), never taken from the
  cost model. "Admitted" is the first token's time: the engine does not record admission.
- A request's drawn length must stay hidden from the policy, as in the simulator: it is submitted with
  the workload's max_tokens and ignore_eos, and the driver finishes it with reason STOP (as a stop
  string would) once it has that many tokens, so predictors learn from it. With pipelining a token or
  two may be computed past it; they are dropped and not counted.
- ``match_pool``: the engine's KV pool gets the simulated pool's page count (``SimConfig.num_pages``; the
  page size in bytes is read off a first engine build), so a row whose point is the pool's size (the
  trace protocol's 25% prefix-cache pool, reservation under a binding pool) runs on the same pool. Off,
  the pool is whatever the base config sizes (the device's free memory).
- ``output_scale`` shrinks every output length (and max_tokens) by one factor, keeping the distribution's
  shape, so a run fits a CI machine or a few minutes of GPU time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import msgspec

from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.runtime.tools.simulator.engine import RequestStat, SimConfig, SimResult, TokenGaps
from conveyor.runtime.tools.simulator.workloads import SimRequest
from conveyor.scheduler import FinishReason, Request, SamplingParams


class RealRunner:
    def __init__(self, base: EngineConfig, output_scale: float = 1.0, warmup: int = 2, match_pool: bool = False) -> None:
        self.base = base
        self.output_scale = output_scale
        self.warmup = warmup
        self.match_pool = match_pool
        self.page_bytes: int | None = None  # match_pool: learnt from the first engine built
        self.reserved_pages = 0
        self.step_records: list = []  # every timed step of every run: what --fit-records fits

    def engine_config(self, policy: str, sim: SimConfig) -> EngineConfig:
        # The simulated pool is counted in pages; the engine's is sized in bytes by the model's own
        # page size, so unless match_pool the pool is left as the base config sizes it (measured on the device).
        base = self.base
        if self.match_pool and self.page_bytes is not None:
            # + the pool's reserved pages in front of the usable ones (KVLayout.first_page)
            base = msgspec.structs.replace(base, kv_cache_memory=(sim.num_pages + self.reserved_pages) * self.page_bytes)
        return msgspec.structs.replace(
            base, schedule_policy=policy, max_num_seqs=sim.max_num_seqs,
            max_num_batched_tokens=sim.max_num_batched_tokens, enable_chunked_prefill=sim.enable_chunked_prefill,
            block_size=sim.block_size,
            reservation=sim.reservation, reservation_beta=sim.reservation_beta,
            reservation_adapt=sim.reservation_adapt, enable_prefix_caching=sim.enable_prefix_caching,
            priority_aging_s=sim.priority_aging_s, static_batch_size=sim.static_batch_size,
            static_batch_timeout=sim.static_batch_timeout, round_robin_time_slice=sim.round_robin_time_slice)

    def scaled(self, workload: Sequence[SimRequest], vocab: int) -> list[SimRequest]:
        def size(n: int) -> int:
            return max(1, round(n * self.output_scale))
        return [dataclasses.replace(w, prompt=tuple(t % vocab for t in w.prompt), output_len=size(w.output_len),
                                    max_new_tokens=size(w.max_new_tokens)) for w in workload]

    def __call__(self, policy: str, workload: Sequence[SimRequest], sim: SimConfig,
                 trace_every_s: float | None = None) -> SimResult:
        from conveyor.runtime.build import build_engine, release_device_memory
        from conveyor.runtime.tools.compare import WorkItem, warm_up
        from conveyor.runtime.tools.driver import WALL_CLOCK, replay

        if self.match_pool and self.page_bytes is None:
            probe = build_engine(self.engine_config(policy, sim))
            self.page_bytes = probe.executor.kv_layout.page_bytes
            self.reserved_pages = probe.executor.kv_layout.first_page
            probe.close()
            del probe
            release_device_memory()
        core = build_engine(self.engine_config(policy, sim))
        try:
            work = self.scaled(workload, core.model_info.vocab_size)
            warm_up(core, [WorkItem(i, list(w.prompt), 8, 0.0) for i, w in enumerate(work)], self.warmup, 0.0)
            preempted0 = core.scheduler.num_preemptions
            retracted0 = core.scheduler.num_retractions
            core.step_records = []
            target = {w.request_id: w.output_len for w in work}
            live: list[Request] = []
            result = SimResult(policy)
            next_trace = 0.0

            def make_request(w: SimRequest, t0: float) -> Request:
                params = SamplingParams(temperature=0.0, max_tokens=w.max_new_tokens, ignore_eos=True)
                req = core.inputs.make_request(list(w.prompt), params, request_id=w.request_id)
                req.arrival_time, req.priority, req.tenant = t0 + w.arrival, w.priority, w.tenant
                live.append(req)
                return req

            def trace(elapsed: float) -> None:
                nonlocal next_trace
                if trace_every_s is not None and elapsed >= next_trace:
                    result.trace.append((elapsed, core.scheduler.policy.metrics()))
                    next_trace = elapsed + trace_every_s

            gaps = TokenGaps(WALL_CLOCK, target)

            def stop_at_drawn_length(outputs: list[RequestOutput]) -> None:
                gaps(outputs)
                # Every sampled token comes out as one output, so only this step's can reach their length
                # (scanning every request instead cost ~0.2 ms a step at 3,000 requests, on the wall clock).
                for out in outputs:
                    if not out.finished and out.num_output_tokens >= target[out.request_id]:
                        core.abort_request(out.request_id, FinishReason.STOP)

            _, t0 = replay(core, work, lambda w: w.arrival, make_request, before_step=trace,
                           after_step=stop_at_drawn_length)
            records, core.step_records = core.step_records, None
            core.check_integrity()
            self.step_records.extend(records)
            result.steps = len(records)
            result.shapes = [(r.num_tokens, r.kv_tokens_read) for r in records]
            result.sim_time_s = max(r.finish_time for r in live) - t0
            result.preemptions = core.scheduler.num_preemptions - preempted0
            result.retractions = core.scheduler.num_retractions - retracted0
            result.tbt = gaps.gaps
            result.metrics = core.scheduler.policy.metrics()
        finally:
            core.close()
            del core  # free the model and KV pool before the next run builds its own
            release_device_memory()
        for r in live:
            n = min(len(r.output_token_ids), target[r.request_id])
            first, done = r.first_token_time - t0, r.finish_time - t0
            arrival = r.arrival_time - t0
            result.requests.append(RequestStat(
                arrival, first, first - arrival, done - arrival, (done - first) / (n - 1) if n > 1 else 0.0,
                n, r.num_prompt_tokens, r.tenant or "", r.priority, r.num_cached_tokens))
        return result
