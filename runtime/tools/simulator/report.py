"""Summaries of simulation results: percentiles, per-policy metrics and the tables they print as."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from conveyor.runtime.tools.simulator.engine import SimResult


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(res: SimResult, slo_ttft: float = 2.0, slo_tpot: float = 0.1) -> dict[str, float]:
    rq = res.requests
    out: dict[str, float] = {"steps": res.steps, "sim_time_s": res.sim_time_s, "preemptions": res.preemptions}
    out["output_tok_per_s"] = sum(r.output_len for r in rq) / res.sim_time_s if res.sim_time_s else 0.0
    for metric in ("ttft", "tpot", "e2e"):
        xs = [getattr(r, metric) for r in rq]
        out[f"{metric}_mean"] = statistics.fmean(xs)
        for q in (50, 90, 99):
            out[f"{metric}_p{q}"] = pct(xs, q)
    # The longest decile's p99: what aging must protect under SJF/SRTF.
    longest = sorted(rq, key=lambda r: r.output_len)[-max(1, len(rq) // 10):]
    out["e2e_p99_longest_decile"] = pct([r.e2e for r in longest], 99)
    good = sum(r.ttft <= slo_ttft and r.tpot <= slo_tpot for r in rq)
    out["goodput_rps"] = good / res.sim_time_s if res.sim_time_s else 0.0
    for key in ("tenant", "priority"):
        groups = sorted({getattr(r, key) for r in rq})
        if len(groups) > 1:
            for g in groups:
                mine = [r for r in rq if getattr(r, key) == g]
                out[f"e2e_p95[{key}={g}]"] = pct([r.e2e for r in mine], 95)
                out[f"ttft_p95[{key}={g}]"] = pct([r.ttft for r in mine], 95)
    out.update(res.metrics)
    return out


def format_table(report: Mapping[str, Mapping[str, float]]) -> str:
    keys = list(dict.fromkeys(k for s in report.values() for k in s))
    width = max(32, *(len(k) + 2 for k in keys))
    lines = [f"{'metric':{width}}" + "".join(f"{n:>14}" for n in report)]
    lines += [f"{k:{width}}" + "".join(f"{report[n].get(k, float('nan')):>14.4g}" for n in report) for k in keys]
    return "\n".join(lines)


def wait_share(res: SimResult) -> float:
    """Share of mean E2E spent waiting for admission: no order of the queue removes more than this."""
    waits = statistics.fmean(r.admitted - r.arrival for r in res.requests)
    return waits / statistics.fmean(r.e2e for r in res.requests)
