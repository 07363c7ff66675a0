"""Capacity under a tail-latency SLO (Sarathi-Serve's metric) and the per-load report.

Capacity is the largest arrival rate at which a policy on an engine mode keeps P99 time-between-tokens
within an SLO (a multiple of the unloaded decode step) and the median queueing delay (arrival to
admission) within a bound, found by binary search over the rate at which the trace is replayed. The
same code runs the simulator or the real engine: ``run`` is ``simulate`` or a ``RealRunner``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from conveyor.runtime.tools.simulator.engine import SimConfig, SimResult, measure_capacity, simulate
from conveyor.runtime.tools.simulator.report import pct, summarize, wait_share
from conveyor.runtime.tools.simulator.workloads import SimRequest

Run = Callable[..., SimResult]  # (policy, workload, config, trace_every_s=None) -> SimResult
MakeWorkload = Callable[[float], list[SimRequest]]  # arrival rate -> the trace replayed at that rate


class SLO(NamedTuple):
    tbt_p99_s: float  # P99 time between tokens
    queue_p50_s: float = 2.0  # median arrival-to-admission delay


class Probe(NamedTuple):
    rate: float
    tbt_p99_s: float
    queue_p50_s: float
    ok: bool


class Capacity(NamedTuple):
    rate: float  # req/s; 0.0: no rate probed met the SLO (the lowest probe is in probes)
    saturated: float  # the throughput with everything queued at t = 0 (the search goes up to twice it)
    probes: tuple[Probe, ...]

    @property
    def load_base(self) -> float:
        """What a load of 0.95x multiplies: the capacity, or the saturated rate where no probe met the SLO."""
        return self.rate if self.rate > 0 else self.saturated


def unloaded_decode_step(workload: Sequence[SimRequest], config: SimConfig, run: Run = simulate,
                         n: int = 4) -> float:
    """Median time between tokens of ``n`` requests run one at a time: the unloaded decode step."""
    cfg = msgspec.structs.replace(config, max_num_seqs=1)
    res = run("fcfs", [dataclasses.replace(r, arrival=0.0) for r in list(workload)[:n]], cfg)
    return statistics.median(res.tbt) if res.tbt else config.cost.step_s(1, 0)


def queue_delays(res: SimResult) -> list[float]:
    return [r.admitted - r.arrival for r in res.requests]


def probe(res: SimResult, rate: float, slo: SLO) -> Probe:
    tbt = pct(res.tbt, 99) if res.tbt else 0.0
    queue = statistics.median(queue_delays(res))
    return Probe(rate, tbt, queue, tbt <= slo.tbt_p99_s and queue <= slo.queue_p50_s)


def search_capacity(make: MakeWorkload, config: SimConfig, slo: SLO, policy: str = "fcfs", run: Run = simulate,
                    iters: int = 8, rel_tol: float = 0.02) -> Capacity:
    """Binary search for the largest rate meeting ``slo``, between 0 and twice the saturated throughput
    (a replayed trace is bursty: short stretches above the mean rate are what break the SLO first)."""
    sat = measure_capacity(make(math.inf), config, run)
    if not 0 < sat < math.inf:  # a slice so small that nothing finishes before the last admission
        burst = run(policy, make(math.inf), config)
        sat = len(burst.requests) / burst.sim_time_s
    lo, hi = 0.0, 2.0 * sat
    probes: list[Probe] = []
    top = probe(run(policy, make(hi), config), hi, slo)
    probes.append(top)
    if top.ok:
        return Capacity(hi, sat, tuple(probes))
    for _ in range(iters):
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        p = probe(run(policy, make(mid), config), mid, slo)
        probes.append(p)
        lo, hi = (mid, hi) if p.ok else (lo, mid)
    return Capacity(lo, sat, tuple(probes))


LOAD_KEYS = ("e2e_mean", "e2e_p99", "ttft_mean", "ttft_p99", "tbt_p99", "queue_p50", "goodput_rps", "output_tok_per_s",
             "preemptions", "retractions", "prefix_hit_rate", "e2e_p99_longest_decile",
             "length_predictor_kendall_tau")


def summarize_load(res: SimResult, slo: SLO, slo_ttft: float = 2.0) -> dict[str, float]:
    """``summarize`` plus P99 TBT, median queueing, retractions and the prefix hit rate; goodput counts the
    requests whose TTFT <= ``slo_ttft`` and whose mean TPOT <= the TBT SLO."""
    row = summarize(res, slo_ttft, slo.tbt_p99_s)
    row["tbt_p99"] = pct(res.tbt, 99) if res.tbt else 0.0
    row["queue_p50"] = statistics.median(queue_delays(res))
    row["retractions"] = res.retractions
    prompt = sum(r.prompt_len for r in res.requests)
    row["prefix_hit_rate"] = sum(r.cached for r in res.requests) / prompt if prompt else 0.0
    return row


def per_load(make: MakeWorkload, capacity: float, policies: Sequence[str], config: SimConfig, slo: SLO,
             loads: Sequence[float] = (0.5, 0.8, 0.95, 1.1), run: Run = simulate,
             extra: Callable[[str, list[SimRequest], SimConfig], dict[str, SimResult]] | None = None,
             ) -> dict[str, dict[str, dict[str, float]]]:
    """load label -> policy -> summary, every policy at each multiple of ``capacity``. ``extra(load label,
    workload, config)`` adds runs of its own (e.g. sjf with the true lengths) to a load's table."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for load in loads:
        work = make(load * capacity)
        label = f"{load:g}x"
        results = {p: run(p, work, config) for p in policies}
        if extra is not None:
            results |= extra(label, work, config)
        out[label] = {p: {k: v for k, v in summarize_load(r, slo).items() if k in LOAD_KEYS}
                      for p, r in results.items()}
        for p, r in results.items():
            out[label][p] |= {"wait_share": wait_share(r), "rate_rps": load * capacity}
    return out
