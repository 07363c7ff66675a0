"""``conveyor simulate``: compare scheduling policies without a GPU.

The real scheduler, policies and KV bookkeeping run; only the device is replaced, by a step-time
model ``a + b * tokens + c * kv_tokens_read`` seconds (``CostModel``; the defaults are rough H100
numbers for a ~0.5B model). ``--fit-records FILE`` fits a, b, c by least squares to the step
records of a real engine (``scripts/bench_offline.py --step-records FILE``). Requests stop at an
output length drawn by the workload, which only the simulator knows: a policy sees prompts and
``max_tokens`` as in the engine, so an SJF predictor has to learn lengths from prompts.

    conveyor simulate --workload heavy-tail --load 0.85 --policies fcfs sjf srtf
    conveyor simulate --scenario sjf            # sjf, priority, fair, static, adaptive or all
    conveyor simulate --scenario fair --plot out/
    conveyor simulate --fit-records steps.json --scenario sjf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

from memory import KVCacheManager, make_reservation
from runtime.step_stats import StepRecord
from scheduler import (
    FinishReason,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerLimits,
    make_policy,
)
from scheduler.policies import POLICY_NAMES

# -- workloads ------------------------------------------------------------------------------
# Heavy tail: lognormal output lengths with mean ~250 and p99 ~2,000 (sigma 1.2, so
# mu = ln 250 - sigma^2 / 2). The prompt's task template explains part of the spread: log length =
# mu + task effect (sigma 0.96) + noise (sigma 0.72), so even a predictor that knew every task's
# effect reaches only a correlation of 0.8 with the log length (Kendall's tau ~0.59), about what
# learned predictors reach on real chat traces. The policy never sees the drawn length.
HEAVY_SIGMA = 1.2
HEAVY_MU = math.log(250) - HEAVY_SIGMA**2 / 2
TASK_SIGMA = 0.96
NOISE_SIGMA = math.sqrt(HEAVY_SIGMA**2 - TASK_SIGMA**2)
NUM_TASKS = 32
TEMPLATE_TOKENS = 8
MAX_NEW_TOKENS = 2048
WORKLOADS = ("heavy-tail", "priority", "tenants", "mixed")


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival: float  # seconds from the start
    prompt: tuple[int, ...]
    output_len: int  # where the simulator stops it; the policy never sees this
    max_new_tokens: int
    priority: int = 0
    tenant: str | None = None


def _task_effects() -> list[float]:
    """Evenly spaced normal quantiles, rescaled so their spread is exactly TASK_SIGMA."""
    raw = [statistics.NormalDist().inv_cdf((k + 0.5) / NUM_TASKS) for k in range(NUM_TASKS)]
    scale = TASK_SIGMA / statistics.pstdev(raw)
    return [x * scale for x in raw]


_TASK_EFFECTS = _task_effects()


def heavy_tail_request(rng: random.Random, request_id: str, arrival: float, priority: int = 0,
                       tenant: str | None = None) -> SimRequest:
    task = rng.randrange(NUM_TASKS)
    log_len = HEAVY_MU + _TASK_EFFECTS[task] + rng.gauss(0.0, NOISE_SIGMA)
    length = max(1, min(MAX_NEW_TOKENS, round(math.exp(log_len))))
    template = tuple(1000 + TEMPLATE_TOKENS * task + j for j in range(TEMPLATE_TOKENS))  # the task's system prompt
    body = tuple(rng.randrange(2000, 30000) for _ in range(rng.randint(16, 256)))
    return SimRequest(request_id, arrival, template + body, length, MAX_NEW_TOKENS, priority, tenant)


def mixed_request(rng: random.Random, request_id: str, arrival: float, priority: int = 0,
                  tenant: str | None = None) -> SimRequest:
    """The offline benchmark's mix: prompt and output lengths uniform in [100, 1024]."""
    prompt = tuple(rng.randrange(2000, 30000) for _ in range(rng.randint(100, 1024)))
    return SimRequest(request_id, arrival, prompt, rng.randint(100, 1024), 1024, priority, tenant)


class Stream(NamedTuple):
    """One Poisson source: ``rate`` requests/s (``inf``: all at t=0), ``n`` of them."""

    rate: float
    n: int
    priority: int = 0
    tenant: str | None = None
    make: Callable[..., SimRequest] = heavy_tail_request


def merge_streams(streams: Sequence[Stream], seed: int = 0) -> list[SimRequest]:
    """Each stream draws from its own seeded generator, so adding a stream leaves the others as they were."""
    out: list[SimRequest] = []
    for k, st in enumerate(streams):
        rng = random.Random(f"{seed}:{k}")
        t = 0.0
        for i in range(st.n):
            if not math.isinf(st.rate):
                t += rng.expovariate(st.rate)
            out.append(st.make(rng, f"{k}-{i}", t, st.priority, st.tenant))
    return sorted(out, key=lambda r: r.arrival)


def make_workload(kind: str, n: int, rate: float, seed: int = 0) -> list[SimRequest]:
    """``rate`` is the total arrival rate; ``inf`` sends everything at t=0."""
    if kind == "heavy-tail":
        return merge_streams([Stream(rate, n)], seed)
    if kind == "priority":  # a fifth of the requests urgent (priority 0; lower is more urgent)
        return merge_streams([Stream(rate * 0.2, n // 5, 0), Stream(rate * 0.8, n - n // 5, 1)], seed)
    if kind == "tenants":  # tenant A at 4x tenant B's rate
        return merge_streams([Stream(rate * 0.8, n - n // 5, tenant="A"), Stream(rate * 0.2, n // 5, tenant="B")],
                             seed)
    if kind == "mixed":
        return merge_streams([Stream(rate, n, make=mixed_request)], seed)
    raise ValueError(f"unknown workload {kind!r}: expected one of {', '.join(WORKLOADS)}")


# -- the step-time model --------------------------------------------------------------------
class CostModel(msgspec.Struct, frozen=True):
    """Seconds per step: ``base_s + per_token_s * tokens + per_kv_token_s * kv_tokens_read``."""

    base_s: float = 0.006  # launch + reading the weights once
    per_token_s: float = 2e-5  # compute per query token
    per_kv_token_s: float = 2e-8  # attention reads of KV (StepRecord.kv_tokens_read: sum of KV lengths)

    def step_s(self, num_tokens: int, kv_tokens_read: int) -> float:
        return self.base_s + self.per_token_s * num_tokens + self.per_kv_token_s * kv_tokens_read

    @classmethod
    def parse(cls, text: str) -> CostModel:
        try:
            a, b, c = (float(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a,b,c (seconds, s/token, s/kv-token), got {text!r}") from None
        return cls(a, b, c)

    def r_squared(self, records: Iterable[StepRecord]) -> float:
        x, y = _design(records)
        pred = x @ np.array([self.base_s, self.per_token_s, self.per_kv_token_s])
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0


def _design(records: Iterable[StepRecord]) -> tuple[np.ndarray, np.ndarray]:
    rows = [(1.0, r.num_tokens, r.kv_tokens_read, r.device[1] - r.device[0]) for r in records]
    if not rows:
        raise ValueError("no step records to fit")
    m = np.asarray(rows, dtype=np.float64)
    return m[:, :3], m[:, 3]


def fit_cost_model(records: Iterable[StepRecord]) -> CostModel:
    """Least squares of device seconds on (1, num_tokens, kv_tokens_read), coefficients kept >= 0.

    A negative coefficient (e.g. KV reads that a CPU's caches hide) would let a simulated step take
    negative time, so this is non-negative least squares: with three unknowns, the best of the
    fits over every subset of columns whose coefficients all come out non-negative.
    """
    x, y = _design(records)
    best: tuple[float, np.ndarray] | None = None
    for mask in range(1, 8):
        cols = [i for i in range(3) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(3)
        full[cols] = coef
        sse = float(((x @ full - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, full)
    if best is None:  # every subset went negative: durations do not grow with work at all
        return CostModel(max(0.0, float(y.mean())), 0.0, 0.0)
    a, b, c = (float(v) for v in best[1])
    return CostModel(a, b, c)


def load_step_records(path: Path) -> list[StepRecord]:
    """A JSON array of objects with StepRecord's field names (tuples as 2-element arrays)."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise TypeError(f"{path}: expected a JSON array of step records")
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in StepRecord._fields if f not in row]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}")
        out.append(StepRecord(**{f: tuple(row[f]) if isinstance(row[f], list) else row[f] for f in StepRecord._fields}))
    return out


# -- the simulation -------------------------------------------------------------------------
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


def simulate(policy_name: str, workload: Sequence[SimRequest], config: SimConfig = DEFAULT_CONFIG,
             trace_every_s: float | None = None) -> SimResult:
    """Replay ``workload`` through the real scheduler; one loop turn is one engine step at depth 1."""
    clock = SimClock()
    policy = make_policy(policy_name, clock=clock, priority_aging_s=config.priority_aging_s,
                         static_batch_size=config.static_batch_size,
                         static_batch_timeout=config.static_batch_timeout,
                         round_robin_time_slice=config.round_robin_time_slice)
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
        clock.now += cost.step_s(*shape)
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


def measure_capacity(workload: Sequence[SimRequest], config: SimConfig = DEFAULT_CONFIG) -> float:
    """Saturated throughput in requests/s: everything arrives at once, FCFS (which serves the mix as
    it comes), counted until the last request is admitted, so the drain at the end is left out."""
    res = simulate("fcfs", [dataclasses.replace(r, arrival=0.0) for r in workload], config)
    until = max(r.admitted for r in res.requests)
    done = sum(1 for r in res.requests if r.e2e <= until)
    return done / until if until > 0 else math.inf


# -- summaries ------------------------------------------------------------------------------
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


# -- scenarios: the targets ---------------------------------------------------------
class Check(NamedTuple):
    name: str
    value: float
    target: str  # e.g. ">= 2"
    ok: bool


@dataclass
class ScenarioReport:
    name: str
    notes: list[str] = field(default_factory=list)
    tables: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # title -> policy -> summary
    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, value: float, target: str, ok: bool) -> None:
        self.checks.append(Check(name, value, target, bool(ok)))

    def render(self) -> str:
        out = [f"=== scenario {self.name} ===", *self.notes]
        for title, table in self.tables.items():
            out += ["", f"-- {title}", format_table(table)]
        out += ["", "targets:"]
        out += [f"  [{'ok' if c.ok else 'MISS'}] {c.name}: {c.value:.3g} (target {c.target})" for c in self.checks]
        return "\n".join(out)


@dataclass
class ScenarioContext:
    config: SimConfig
    seed: int = 0
    scale: float = 1.0  # multiplies request counts; tests run small
    plot_dir: Path | None = None
    queue_bound_seqs: int = 2  # the second regime of the sjf and adaptive scenarios

    def n(self, base: int) -> int:
        return max(20, int(base * self.scale))

    def count(self, rate: float, duration_s: float) -> int:
        """Requests a stream at ``rate`` sends in ``duration_s`` (scaled) seconds."""
        return max(1, round(rate * duration_s * self.scale))

    def capacity(self, config: SimConfig | None = None, make: Callable[..., SimRequest] = heavy_tail_request) -> float:
        return measure_capacity(merge_streams([Stream(math.inf, self.n(2000), make=make)], self.seed + 1000),
                                config or self.config)

    def regimes(self) -> list[tuple[str, SimConfig, int]]:
        """(name, config, requests per run): the engine as configured, and the same engine able to run
        only a couple of sequences at once (a big model on a small device), where queueing, the
        thing SJF reorders, is most of the latency. Fewer requests there: its runs take more steps."""
        c = self.config
        small = msgspec.structs.replace(c, max_num_seqs=self.queue_bound_seqs)
        return [(f"{c.max_num_seqs} seqs", c, self.n(3000)),
                (f"{small.max_num_seqs} seqs", small, self.n(1500))]


def wait_share(res: SimResult) -> float:
    """Share of mean E2E spent waiting for admission: no order of the queue removes more than this."""
    waits = statistics.fmean(r.admitted - r.arrival for r in res.requests)
    return waits / statistics.fmean(r.e2e for r in res.requests)


def scenario_sjf(ctx: ScenarioContext, loads: Sequence[float] = (0.85, 0.9)) -> ScenarioReport:
    rep = ScenarioReport("sjf", [(
        "heavy-tail outputs (lognormal, mean ~250, p99 ~2000; the prompt's task template explains part of the "
        "length, so the best possible tau is ~0.59). 'fcfs_wait_bound' is the most any order of the queue can "
        "gain over fcfs: 1 / (1 - share of fcfs's mean E2E spent waiting for admission)")])
    for regime, cfg, n in ctx.regimes():
        cap = ctx.capacity(cfg)
        for load in loads:
            work = merge_streams([Stream(load * cap, n)], ctx.seed)
            results = {p: simulate(p, work, cfg) for p in ("fcfs", "sjf", "srtf")}
            table = {p: summarize(r) for p, r in results.items()}
            fcfs = table["fcfs"]
            fcfs["fcfs_wait_bound"] = 1 / max(1e-9, 1 - wait_share(results["fcfs"]))
            rep.tables[f"{regime}, {load:.0%} of capacity ({cap:.2f} req/s), {n} requests"] = {
                p: {k: v for k, v in row.items() if k in (
                    "e2e_mean", "e2e_p50", "e2e_p99", "e2e_p99_longest_decile", "ttft_p99", "preemptions",
                    "length_predictor_kendall_tau", "fcfs_wait_bound")} for p, row in table.items()}
            for p in ("sjf", "srtf"):
                where = f"{regime}, {load:.0%}, {p}"
                ratio = fcfs["e2e_mean"] / table[p]["e2e_mean"]
                rep.check(f"{where}: mean E2E fcfs / {p}", ratio, ">= 2", ratio >= 2.0)
                worse = table[p]["e2e_p99_longest_decile"] / fcfs["e2e_p99_longest_decile"]
                rep.check(f"{where}: longest decile's p99 E2E {p} / fcfs", worse, "<= 2", worse <= 2.0)
                tau = table[p]["length_predictor_kendall_tau"]
                rep.check(f"{where}: predictor Kendall tau", tau, ">= 0.5", tau >= 0.5)
    return rep


def scenario_priority(ctx: ScenarioContext, urgent_share: float = 0.1,
                      low_loads: Sequence[float] = (0.5, 1.0, 1.5), duration_s: float = 240.0) -> ScenarioReport:
    cap = ctx.capacity()
    rep = ScenarioReport("priority", [(
        f"urgent (priority 0) at {urgent_share:.0%} of capacity {cap:.2f} req/s; background (priority 1) at "
        f"{', '.join(f'{x:.0%}' for x in low_loads)}; heavy-tail lengths; {duration_s * ctx.scale:.0f} s of arrivals")])
    hi = Stream(urgent_share * cap, ctx.count(urgent_share * cap, duration_s), priority=0)
    alone = simulate("priority", merge_streams([hi], ctx.seed), ctx.config)
    base = pct([r.ttft for r in alone.requests], 95)
    rep.notes.append(f"urgent p95 TTFT unloaded (urgent traffic alone): {base * 1000:.2f} ms")
    for policy in ("fcfs", "priority"):
        table: dict[str, dict[str, float]] = {}
        for load in low_loads:
            lo = Stream(load * cap, ctx.count(load * cap, duration_s), priority=1)
            res = simulate(policy, merge_streams([hi, lo], ctx.seed), ctx.config)
            urgent = [r for r in res.requests if r.priority == 0]
            table[f"low {load:.0%}"] = {
                "urgent_ttft_p50_ms": 1000 * pct([r.ttft for r in urgent], 50),
                "urgent_ttft_p95_ms": 1000 * pct([r.ttft for r in urgent], 95),
                "urgent_ttft_p95_vs_unloaded": pct([r.ttft for r in urgent], 95) / base,
                "urgent_e2e_p95_s": pct([r.e2e for r in urgent], 95),
                "background_e2e_p95_s": pct([r.e2e for r in res.requests if r.priority == 1], 95),
                "preemptions": res.preemptions,
            }
        rep.tables[f"policy {policy}"] = table
        if policy == "priority":
            for name, row in table.items():
                v = row["urgent_ttft_p95_vs_unloaded"]
                rep.check(f"priority, {name}: urgent p95 TTFT / unloaded", v, "<= 1.5", v <= 1.5)
    return rep


def scenario_fair(ctx: ScenarioContext, b_load: float = 0.3, a_over_b: float = 4.0,
                  duration_s: float = 240.0) -> ScenarioReport:
    cap = ctx.capacity()
    a_load = a_over_b * b_load
    rep = ScenarioReport("fair", [(
        f"tenant A at {a_load:.0%} and tenant B at {b_load:.0%} of capacity {cap:.2f} req/s ({a_over_b:g}x the "
        f"rate; {a_load + b_load:.0%} in all, so the engine is overloaded and A is far above its half share); "
        f"heavy-tail lengths; {duration_s * ctx.scale:.0f} s of arrivals")])
    b = Stream(b_load * cap, ctx.count(b_load * cap, duration_s), tenant="B")
    a = Stream(a_load * cap, ctx.count(a_load * cap, duration_s), tenant="A")
    alone = simulate("fcfs", merge_streams([b], ctx.seed + 1), ctx.config)
    b_alone = pct([r.e2e for r in alone.requests], 95)
    rep.notes.append(f"B alone: p95 E2E {b_alone:.3f} s")
    both = merge_streams([b, a], ctx.seed + 1)  # B first: its requests are the same as alone
    table, traces = {}, {}
    for policy in ("fcfs", "round-robin", "fair"):
        res = simulate(policy, both, ctx.config, trace_every_s=1.0 if policy == "fair" else None)
        row = summarize(res)
        row["b_e2e_p95_vs_alone"] = row["e2e_p95[tenant=B]"] / b_alone
        table[policy] = {k: v for k, v in row.items() if k.startswith(("e2e_p95[", "ttft_p95[")) or k in (
            "b_e2e_p95_vs_alone", "e2e_mean", "output_tok_per_s")}
        traces[policy] = res.trace
    rep.tables["tenants"] = table
    v = table["fair"]["b_e2e_p95_vs_alone"]
    rep.check("fair: B p95 E2E / B alone", v, "<= 1.3", v <= 1.3)
    # Bounded means: no growth while both tenants keep sending. After the last arrival the gap to
    # a tenant whose last requests still run grows (nothing arrives to lift it), which is harmless.
    last = min(max(r.arrival for r in both if r.tenant == t) for t in ("A", "B"))
    gaps = [(t, m["fair_counter_gap"]) for t, m in traces["fair"]]
    during = [g for t, g in gaps if t <= last]
    first, second = max(during[: len(during) // 2]), max(during[len(during) // 2:])
    rep.notes.append(f"VTC counter gap between active tenants while both send: max {first:.0f} in the first half, "
                     f"{second:.0f} in the second (weighted tokens; one long request is ~{2 * MAX_NEW_TOKENS})")
    rep.check("fair: counter gap, max over 2nd half / max over 1st half", second / max(first, 1.0), "<= 1.5 (bounded)",
              second <= 1.5 * max(first, 1.0))
    if ctx.plot_dir is not None:
        path = plot_counter_gap(gaps, last, ctx.plot_dir / "fair_counter_gap.png")
        rep.notes.append(f"plot: {path}")
    return rep


def plot_counter_gap(gaps: Sequence[tuple[float, float]], last_arrival: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t for t, _ in gaps], [g for _, g in gaps], lw=1)
    ax.axvline(last_arrival, color="grey", ls="--", lw=1, label="a tenant stops sending")
    ax.legend()
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("max - min counter (weighted tokens)")
    ax.set_title("fair (VTC): service counter gap between active tenants")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def scenario_static(ctx: ScenarioContext) -> ScenarioReport:
    cfg = msgspec.structs.replace(ctx.config, static_batch_size=ctx.config.max_num_seqs)
    rep = ScenarioReport("static", [(
        f"offline: {ctx.n(256)} requests at t=0, prompt and output lengths uniform in [100, 1024]; static batches of "
        f"{cfg.static_batch_size} (= max_num_seqs). Static batches are padded only in the count: Conveyor never "
        "computes padding, so the throughput gap here is the slots a static batch leaves idle")])
    work = merge_streams([Stream(math.inf, ctx.n(256), make=mixed_request)], ctx.seed)
    table = {p: summarize(simulate(p, work, cfg)) for p in ("fifo", "static", "fcfs")}
    rep.tables["mixed lengths"] = {p: {k: v for k, v in row.items() if k in (
        "sim_time_s", "steps", "output_tok_per_s", "e2e_mean", "e2e_p99", "static_padding_waste")}
        for p, row in table.items()}
    gap = table["fcfs"]["output_tok_per_s"] / table["static"]["output_tok_per_s"]
    rep.check("continuous / static output throughput", gap, "> 1", gap > 1.0)
    rep.check("static padding waste (share of token slots)", table["static"]["static_padding_waste"], "reported", True)
    return rep


def scenario_adaptive(ctx: ScenarioContext, loads: Sequence[float] = (0.3, 0.7, 1.1),
                      fixed: Sequence[str] = ("fcfs", "sjf", "srtf")) -> ScenarioReport:
    rep = ScenarioReport("adaptive", [(
        f"heavy-tail outputs at {', '.join(f'{x:.0%}' for x in loads)} of capacity; the measure is mean E2E. "
        "priority is left out of the fixed policies: with one priority level it orders as fcfs")])
    for regime, cfg, n in ctx.regimes():
        cap = ctx.capacity(cfg)
        for load in loads:
            work = merge_streams([Stream(load * cap, n)], ctx.seed)
            table = {p: summarize(simulate(p, work, cfg)) for p in (*fixed, "adaptive")}
            rep.tables[f"{regime}, {load:.0%} of capacity ({cap:.2f} req/s), {n} requests"] = {
                p: {k: v for k, v in row.items() if k in (
                    "e2e_mean", "e2e_p99", "e2e_p99_longest_decile", "goodput_rps", "preemptions",
                    "adaptive_policy_switches")} for p, row in table.items()}
            best = min(fixed, key=lambda p: table[p]["e2e_mean"])
            v = table["adaptive"]["e2e_mean"] / table[best]["e2e_mean"]
            rep.check(f"{regime}, {load:.0%}: adaptive mean E2E / best fixed ({best})", v, "<= 1.05", v <= 1.05)
    return rep


SCENARIOS: dict[str, Callable[[ScenarioContext], ScenarioReport]] = {
    "sjf": scenario_sjf, "priority": scenario_priority, "fair": scenario_fair, "static": scenario_static,
    "adaptive": scenario_adaptive,
}


# -- the command line -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT_CONFIG  # (a Struct's class attributes are its field descriptors, not the defaults)
    p = argparse.ArgumentParser(prog="conveyor simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("what to run")
    w.add_argument("--scenario", choices=[*SCENARIOS, "all"], default=None,
                   help="one of the issue's targets: runs its workload(s) and policies and checks the target")
    w.add_argument("--workload", choices=WORKLOADS, default="heavy-tail",
                   help="heavy-tail; priority (a fifth urgent); tenants (A at 4x B's rate); mixed (lengths 100-1024)")
    w.add_argument("--policies", nargs="+", default=["fcfs", "sjf", "srtf"], choices=POLICY_NAMES)
    w.add_argument("--num-requests", type=int, default=1000)
    rate = w.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=None, help="Poisson arrivals per simulated second (inf: all at 0)")
    rate.add_argument("--load", type=float, default=None,
                      help="arrival rate as a fraction of the measured capacity for this workload (default 0.85)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--scale", type=float, default=1.0, help="scenarios: multiply their request counts")
    w.add_argument("--queue-bound-seqs", type=int, default=2,
                   help="scenarios sjf and adaptive: max_num_seqs of their second, queue-bound regime")
    e = p.add_argument_group("engine limits and policy knobs (the engine's flags)")
    e.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    e.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    e.add_argument("--max-model-len", type=int, default=d.max_model_len)
    e.add_argument("--num-pages", type=int, default=d.num_pages, help="KV pages in the pool")
    e.add_argument("--block-size", type=int, default=d.block_size)
    e.add_argument("--reservation", choices=["conservative", "dynamic"], default=d.reservation)
    e.add_argument("--reservation-beta", type=float, default=d.reservation_beta)
    e.add_argument("--reservation-adapt", action=argparse.BooleanOptionalAction, default=d.reservation_adapt)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching)
    e.add_argument("--priority-aging-s", type=float, default=d.priority_aging_s)
    e.add_argument("--static-batch-size", type=int, default=d.static_batch_size)
    e.add_argument("--static-batch-timeout", type=float, default=d.static_batch_timeout)
    e.add_argument("--round-robin-time-slice", type=int, default=d.round_robin_time_slice)
    c = p.add_argument_group("step-time model")
    cost = c.add_mutually_exclusive_group()
    cost.add_argument("--cost", type=CostModel.parse, default=None, metavar="A,B,C",
                      help="step seconds = A + B * tokens + C * kv tokens read (default: "
                      f"{','.join(f'{v:g}' for v in msgspec.structs.astuple(d.cost))})")
    cost.add_argument("--fit-records", type=Path, default=None, metavar="FILE",
                      help="fit A, B, C to a JSON array of StepRecords (bench_offline.py --step-records)")
    o = p.add_argument_group("output")
    o.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO, seconds")
    o.add_argument("--slo-tpot", type=float, default=0.1, help="goodput SLO, seconds")
    o.add_argument("--json", type=Path, default=None, help="write the summaries (and scenario checks) here")
    o.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write plots here (fair: counter gap)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import structlog

    if not structlog.is_configured():  # run as scripts/simulate.py: keep policy logs off stdout's tables
        from runtime.logging import configure_logging

        configure_logging("warning")
    args = build_parser().parse_args(argv)
    cost = args.cost or CostModel()
    if args.fit_records is not None:
        records = load_step_records(args.fit_records)
        cost = fit_cost_model(records)
        print(f"fitted cost model from {len(records)} steps: a = {cost.base_s * 1e3:.4g} ms, "
              f"b = {cost.per_token_s * 1e6:.4g} us/token, c = {cost.per_kv_token_s * 1e9:.4g} ns/kv-token, "
              f"R^2 = {cost.r_squared(records):.4f}")
    config = SimConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, num_pages=args.num_pages, block_size=args.block_size,
        reservation=args.reservation, reservation_beta=args.reservation_beta, reservation_adapt=args.reservation_adapt,
        enable_prefix_caching=args.enable_prefix_caching, priority_aging_s=args.priority_aging_s,
        static_batch_size=args.static_batch_size, static_batch_timeout=args.static_batch_timeout,
        round_robin_time_slice=args.round_robin_time_slice, cost=cost,
    )
    out: dict[str, Any] = {"config": msgspec.to_builtins(config)}
    if args.scenario is not None:
        ctx = ScenarioContext(config, args.seed, args.scale, args.plot, args.queue_bound_seqs)
        names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
        missed = 0
        for name in names:
            rep = SCENARIOS[name](ctx)
            print(rep.render(), end="\n\n", flush=True)
            missed += sum(not c.ok for c in rep.checks)
            out[name] = {"notes": rep.notes, "tables": rep.tables, "checks": [c._asdict() for c in rep.checks]}
        print(f"{missed} target(s) missed" if missed else "all targets met")
    else:
        if args.rate is not None:
            rate = args.rate
        else:
            make = mixed_request if args.workload == "mixed" else heavy_tail_request
            cap = measure_capacity(merge_streams([Stream(math.inf, 2000, make=make)], args.seed + 1000), config)
            rate = (args.load if args.load is not None else 0.85) * cap
            print(f"capacity {cap:.3f} req/s; arrivals at {rate:.3f} req/s")
        work = make_workload(args.workload, args.num_requests, rate, args.seed)
        report = {p: summarize(simulate(p, work, config), args.slo_ttft, args.slo_tpot) for p in args.policies}
        print(format_table(report))
        out.update(workload=args.workload, rate=rate, policies=report)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0
