#!/usr/bin/env python3
"""Compare scheduling policies without a GPU: the real scheduler and KV bookkeeping, simulated time.

Each step's duration comes from a cost model, ``a + b * tokens + c * kv_tokens_read`` seconds
(defaults are rough H100 numbers for a ~0.5B model; fit a, b, c from an engine's StepRecords for
a real device). Requests stop at their drawn output length, so the policy's only effect is order.

    python scripts/simulate.py --workload heavy-tail --rate 6 --policies fcfs sjf srtf
    python scripts/simulate.py --workload tenants --policies fcfs fair round-robin --json out.json

Workloads: ``heavy-tail`` (lognormal outputs, mean ~250, p99 ~2,000; the prompt's template token
tells the length class, so the predictor has something to learn), ``priority`` (a fifth of the
requests urgent), ``tenants`` (tenant A at 4x tenant B's rate).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import KVCacheManager, make_reservation
from scheduler import (
    FinishReason,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerLimits,
    make_policy,
)
from scheduler.policies import POLICY_NAMES


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival: float  # seconds from the start
    prompt: tuple[int, ...]
    output_len: int
    max_new_tokens: int
    priority: int = 0
    tenant: str | None = None


@dataclass(frozen=True)
class StepCost:
    base_s: float = 0.006  # launch + weights read once per step
    per_token_s: float = 2e-5  # compute per query token
    per_kv_token_s: float = 2e-8  # attention reads of cached KV

    def __call__(self, num_tokens: int, kv_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_tokens + self.per_kv_token_s * kv_tokens


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimResult:
    policy: str
    steps: int = 0
    sim_time_s: float = 0.0
    preemptions: int = 0
    requests: list[dict] = field(default_factory=list)  # per request: ttft, e2e, tpot, tenant, priority
    extra: dict[str, float] = field(default_factory=dict)


def make_workload(kind: str, n: int, rate: float, seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    sigma = 1.2  # lognormal with mean ~250 and p99 ~2,000: mu = ln 250 - sigma^2 / 2
    mu = math.log(250) - sigma**2 / 2
    for i in range(n):
        t += rng.expovariate(rate)
        length = max(1, min(2048, int(rng.lognormvariate(mu, sigma))))
        template = 100 + min(10, length.bit_length())  # a task template that predicts the length class
        prompt = (template, template + 1, *(rng.randrange(200, 30000) for _ in range(rng.randint(16, 256))))
        priority, tenant = 0, None
        if kind == "priority":
            priority = 0 if rng.random() < 0.2 else 1
        elif kind == "tenants":
            tenant = "A" if rng.random() < 0.8 else "B"
        elif kind != "heavy-tail":
            raise ValueError(f"unknown workload {kind!r}")
        out.append(SimRequest(str(i), t, prompt, length, 2048, priority, tenant))
    return out


def simulate(policy_name: str, workload: list[SimRequest], limits: SchedulerLimits, num_pages: int,
             page_size: int = 16, cost: StepCost | None = None, reservation: str = "dynamic",
             reservation_beta: float = 0.3, **policy_options: object) -> SimResult:
    cost = cost or StepCost()
    clock = SimClock()
    policy = make_policy(policy_name, clock=clock, **policy_options)
    s = Scheduler(limits, policy, KVCacheManager(num_pages, page_size, make_reservation(reservation, reservation_beta)))
    pending = sorted(workload, key=lambda r: r.arrival)
    specs = {r.request_id: r for r in workload}
    live: dict[str, Request] = {}
    result = SimResult(policy_name)
    i = 0
    while i < len(pending) or s.has_work():
        while i < len(pending) and pending[i].arrival <= clock.now:
            w = pending[i]
            req = Request(w.request_id, list(w.prompt), SamplingParams(max_tokens=w.max_new_tokens, ignore_eos=True),
                          w.max_new_tokens, arrival_time=w.arrival, priority=w.priority, tenant=w.tenant)
            live[w.request_id] = req
            s.add(req)
            i += 1
        batch = s.schedule()
        if batch is None:
            # Idle: jump to the next arrival. Work that cannot start yet (a static batch filling up)
            # lets simulated time pass in step-sized ticks.
            nxt = pending[i].arrival if i < len(pending) else math.inf
            clock.now = min(nxt, clock.now + cost.base_s) if s.has_work() else nxt
            continue
        clock.now += cost(batch.num_tokens, sum(q.start for q in batch.seqs))
        result.steps += 1
        for seq in batch.seqs:
            r = seq.request
            if not seq.samples or r.is_finished or seq.epoch != r.num_preemptions:
                continue
            r.output_token_ids.append(0)
            if r.first_token_time is None:
                r.first_token_time = clock.now
            if len(r.output_token_ids) >= specs[r.request_id].output_len:
                s.finish(r, FinishReason.LENGTH if len(r.output_token_ids) >= r.max_new_tokens else FinishReason.STOP)
                r.finish_time = clock.now
        s.batch_done(batch)
    s.check_integrity()
    result.sim_time_s = clock.now
    result.preemptions = s.num_preemptions
    for r in live.values():
        assert r.first_token_time is not None and r.finish_time is not None
        n = len(r.output_token_ids)
        result.requests.append({
            "ttft": r.first_token_time - r.arrival_time, "e2e": r.finish_time - r.arrival_time,
            "tpot": (r.finish_time - r.first_token_time) / (n - 1) if n > 1 else 0.0,
            "tenant": r.tenant or "", "priority": r.priority, "output_len": n,
        })
    predictor = getattr(policy, "predictor", None)
    if predictor is not None and hasattr(predictor, "kendall_tau"):
        result.extra["predictor_tau"] = predictor.kendall_tau()
    if hasattr(policy, "padding_waste"):
        result.extra["padding_waste"] = policy.padding_waste
    if hasattr(policy, "switches"):
        result.extra["policy_switches"] = len(policy.switches)
    return result


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def summarize(res: SimResult, slo_ttft: float, slo_tpot: float) -> dict[str, float]:
    rq = res.requests
    out: dict[str, float] = {"steps": res.steps, "sim_time_s": res.sim_time_s, "preemptions": res.preemptions}
    for metric in ("ttft", "tpot", "e2e"):
        xs = [r[metric] for r in rq]
        out[f"{metric}_mean"] = statistics.mean(xs)
        for q in (50, 90, 99):
            out[f"{metric}_p{q}"] = pct(xs, q)
    # The longest decile's p99: what aging must protect under SJF/SRTF.
    longest = sorted(rq, key=lambda r: r["output_len"])[-max(1, len(rq) // 10):]
    out["e2e_p99_longest_decile"] = pct([r["e2e"] for r in longest], 99)
    good = sum(r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot for r in rq)
    out["goodput_rps"] = good / res.sim_time_s if res.sim_time_s else 0.0
    for key in ("tenant", "priority"):
        groups = sorted({r[key] for r in rq})
        if len(groups) > 1:
            for g in groups:
                out[f"e2e_p95[{key}={g}]"] = pct([r["e2e"] for r in rq if r[key] == g], 95)
                out[f"ttft_p95[{key}={g}]"] = pct([r["ttft"] for r in rq if r[key] == g], 95)
    out.update(res.extra)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="heavy-tail", choices=["heavy-tail", "priority", "tenants"])
    ap.add_argument("--policies", nargs="+", default=["fcfs", "sjf", "srtf"], choices=POLICY_NAMES)
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--rate", type=float, default=6.0, help="Poisson arrivals per simulated second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-pages", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--priority-aging-s", type=float, default=30.0)
    ap.add_argument("--static-batch-size", type=int, default=8)
    ap.add_argument("--static-batch-timeout", type=float, default=0.5)
    ap.add_argument("--round-robin-time-slice", type=int, default=8)
    ap.add_argument("--step-cost", type=float, nargs=3, metavar=("A", "B", "C"), default=None,
                    help="step seconds = A + B * tokens + C * kv tokens read")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    workload = make_workload(args.workload, args.num_requests, args.rate, args.seed)
    limits = SchedulerLimits(args.max_num_seqs, args.max_num_batched_tokens, 4096)
    cost = StepCost(*args.step_cost) if args.step_cost else StepCost()
    report = {}
    for name in args.policies:
        res = simulate(name, workload, limits, args.num_pages, args.block_size, cost,
                       priority_aging_s=args.priority_aging_s, static_batch_size=args.static_batch_size,
                       static_batch_timeout=args.static_batch_timeout,
                       round_robin_time_slice=args.round_robin_time_slice)
        report[name] = summarize(res, args.slo_ttft, args.slo_tpot)
    keys = list(dict.fromkeys(k for s in report.values() for k in s))
    print(f"{'metric':32}" + "".join(f"{n:>14}" for n in report))
    for k in keys:
        print(f"{k:32}" + "".join(f"{report[n].get(k, float('nan')):>14.4g}" for n in report))
    if args.json:
        args.json.write_text(json.dumps({"workload": args.workload, "policies": report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
