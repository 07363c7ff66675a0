"""The trace protocol (issue #23): capacity under a tail-latency SLO, every policy at 0.5-1.1x of it,
and each technique's target row, on one trace, in the simulator or on the real engine.

``scripts/bench_traces.py`` is its command line. Each ``row_*`` measures one technique against its own
baseline mode of the same engine and returns ``Check``s (value, target, met) next to the numbers and,
where the target is missed, the measured bound that explains it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from conveyor.runtime.tools.simulator.capacity import (
    SLO,
    Capacity,
    Probe,
    Run,
    per_load,
    search_capacity,
    summarize_load,
    unloaded_decode_step,
)
from conveyor.runtime.tools.simulator.engine import SimConfig, SimResult, simulate
from conveyor.runtime.tools.simulator.report import pct
from conveyor.runtime.tools.simulator.scenarios import Check
from conveyor.runtime.tools.simulator.traces import (
    Trace,
    TraceOptions,
    prefix_hit_ceiling,
    to_requests,
    unique_pages,
)
from conveyor.runtime.tools.simulator.workloads import SimRequest
from conveyor.scheduler.policies import POLICY_NAMES

LOADS = (0.5, 0.8, 0.95, 1.1)
ROWS = ("chunked", "reservation", "sjf", "lpm", "priority", "fair", "adaptive", "overlap")
# The trace protocol's engine: Sarathi-Serve's strict-SLO chunk (512 tokens) so a mixed step stays
# within 5x a decode step; a context that holds ShareGPT's <= 8k rows; a pool that binds at 64 seqs.
TRACE_CONFIG = SimConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=8192, num_pages=8192)


@dataclass
class Bench:
    """One trace's run: what it measured, as the JSON writes it."""

    trace: str
    kind: str
    engine: str
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    slo: dict[str, float] = field(default_factory=dict)
    capacity: dict[str, dict[str, Any]] = field(default_factory=dict)  # mode -> rate, saturated, probes
    per_load: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # load -> policy -> row
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # technique -> its numbers
    checks: list[tuple[str, Check]] = field(default_factory=list)  # (the row that checked, the check)
    row: str = ""  # the row being measured: its checks are tagged with it

    def check(self, name: str, value: float, target: str, ok: bool, bound: str = "") -> None:
        name += f" [bound: {bound}]" if bound and not ok else ""
        self.checks.append((self.row, Check(name, value, target, bool(ok))))

    def start_row(self, row: str) -> None:
        """Measuring ``row`` (again): the checks it made before go."""
        self.row = row
        self.checks = [(r, c) for r, c in self.checks if r != row]

    def capacity_of(self, mode: str) -> Capacity:
        """A capacity search's result as recorded (or read back from an earlier run's JSON)."""
        c = self.capacity[mode]
        return Capacity(c["rate"], c["saturated"], tuple(Probe(**p) for p in c["probes"]))

    def to_builtins(self) -> dict[str, Any]:
        return {"trace": self.trace, "kind": self.kind, "engine": self.engine, "notes": self.notes,
                "config": self.config, "slo": self.slo, "capacity": self.capacity, "per_load": self.per_load,
                "rows": self.rows, "checks": [c._asdict() | {"row": r} for r, c in self.checks]}

    @classmethod
    def from_builtins(cls, d: dict[str, Any]) -> Bench:
        checks = [(c.get("row", ""), Check(c["name"], c["value"], c["target"], c["ok"])) for c in d["checks"]]
        return cls(d["trace"], d["kind"], d["engine"], list(d["notes"]), d["config"], d["slo"], d["capacity"],
                   d["per_load"], d["rows"], checks)


@dataclass
class Protocol:
    trace: Trace
    config: SimConfig = TRACE_CONFIG
    options: TraceOptions = TraceOptions()
    run: Run = simulate
    engine: str = "sim"
    policies: Sequence[str] = POLICY_NAMES
    loads: Sequence[float] = LOADS
    iters: int = 7  # binary-search halvings (the bracket ends within 2 x saturated / 2^iters)
    tbt_slo_factor: float = 5.0
    max_tokens_factor: float = 6.0  # reservation row: max_tokens = this x the true mean output
    pool_share: float = 0.25  # lpm row: KV pool = this share of the trace's unique prompt pages
    progress: Callable[[str], None] = lambda s: None
    engine_config: dict[str, Any] = field(default_factory=dict)  # what runs it (the real engine's model, ...)
    bench: Bench = field(init=False)

    def __post_init__(self) -> None:
        self.bench = Bench(self.trace.name, self.trace.kind, self.engine)
        self.options = self.options._replace(max_model_len=self.config.max_model_len,
                                             block_size=self.config.block_size)

    # -- workloads ---------------------------------------------------------------------------
    def workload(self, rate: float, options: TraceOptions | None = None, **kw: Any) -> list[SimRequest]:
        return to_requests(self.trace, rate, options or self.options, **kw)

    def maker(self, options: TraceOptions | None = None) -> Callable[[float], list[SimRequest]]:
        return lambda rate: self.workload(rate, options)

    def capacity(self, mode: str, config: SimConfig, options: TraceOptions | None = None,
                 policy: str = "fcfs") -> Capacity:
        cap = search_capacity(self.maker(options), config, self.slo, policy, self.run, self.iters)
        self.bench.capacity[mode] = {"rate": cap.rate, "saturated": cap.saturated,
                                     "probes": [p._asdict() for p in cap.probes]}
        self.progress(f"capacity[{mode}] = {cap.rate:.4g} req/s (saturated {cap.saturated:.4g})")
        tag = f"capacity[{mode}]:"
        self.bench.notes = [n for n in self.bench.notes if not n.startswith(tag)]  # measured again: the new one stands
        if cap.rate == 0:
            low = min(cap.probes, key=lambda p: p.rate)
            self.bench.notes.append(
                f"{tag} the SLO held at no probed rate (the lowest, {low.rate:.3g} req/s: P99 TBT "
                f"{low.tbt_p99_s * 1e3:.3g} ms, median queueing {low.queue_p50_s:.3g} s); what runs at a multiple of "
                f"this capacity runs at that multiple of the saturated rate, {cap.saturated:.3g} req/s")
        return cap

    def config_builtins(self) -> dict[str, Any]:
        """What a result depends on besides the rows: the limits, the cost, the slice, the engine."""
        out = msgspec.to_builtins(self.config) | {"trace_options": self.options._asdict(),
                                                  "trace_rows": len(self.trace.rows)}
        # as JSON gives it back (tuples as lists), so resume compares it with an earlier run's as equals
        return json.loads(json.dumps(out | ({"engine_config": self.engine_config} if self.engine_config else {})))

    def resume(self, prior: dict[str, Any]) -> None:
        """Go on from an earlier run's JSON of the same trace, slice and engine: its SLO, capacities,
        per-load table and rows stand, so a device run split into calls of a few minutes keeps one SLO
        and one capacity; ``run_all`` then measures the policies and rows it is asked for, replacing theirs."""
        mine = self.config_builtins()
        theirs = {"trace": prior["trace"], "engine": prior["engine"]} | prior["config"]
        for key, value in ({"trace": self.trace.name, "engine": self.engine} | mine).items():
            # a key the earlier JSON lacks (written before it was recorded) cannot be told apart
            if key in theirs and theirs[key] != value:
                raise ValueError(f"resume: the earlier run's {key} is {theirs[key]!r}, this one's {value!r}")
        self.bench = Bench.from_builtins(prior)
        self.bench.config = mine
        self.slo = SLO(prior["slo"]["tbt_p99_s"], prior["slo"]["queue_p50_s"])

    # -- the protocol ------------------------------------------------------------------------
    def baseline(self) -> Capacity:
        if self.bench.slo:  # resumed
            return self.bench.capacity_of("fcfs")
        b = self.bench
        b.config = self.config_builtins()
        unloaded = unloaded_decode_step(self.workload(math.inf), self.config, self.run)
        self.slo = SLO(self.tbt_slo_factor * unloaded)
        b.slo = {"unloaded_decode_step_s": unloaded, "tbt_p99_s": self.slo.tbt_p99_s,
                 "queue_p50_s": self.slo.queue_p50_s}
        b.notes.append(f"{len(self.trace.rows)} rows of {self.trace.name} ({self.trace.kind}); native rate "
                       f"{self.trace.native_rate or float('nan'):.3g} req/s; SLO: P99 TBT <= "
                       f"{self.tbt_slo_factor:g} x {unloaded * 1e3:.3g} ms (unloaded decode step), median queueing "
                       f"<= {self.slo.queue_p50_s:g} s")
        return self.capacity("fcfs", self.config)

    def per_load_table(self, cap: Capacity) -> None:
        def oracle(label: str, work: list[SimRequest], cfg: SimConfig) -> dict[str, SimResult]:
            # sjf/srtf ranking by the true lengths: the ceiling of a learned predictor (simulator only).
            if self.engine != "sim" or not {"sjf", "srtf"} & set(self.policies):
                return {}
            return {f"{p}(true)": simulate(p, work, cfg, true_lengths=True) for p in ("sjf", "srtf")
                    if p in self.policies}

        if not self.policies:  # only the rows (resumed, the earlier run's table stands)
            return
        rate = cap.load_base
        # resumed: the policies measured here replace the earlier run's, the others stand
        for label, table in per_load(self.maker(), rate, self.policies, self.config, self.slo, self.loads, self.run,
                                     extra=oracle).items():
            self.bench.per_load.setdefault(label, {}).update(table)
        self.progress("per-load table done")

    # -- target rows -------------------------------------------------------------------------
    def row_chunked(self, cap: Capacity) -> None:
        prefill_first = msgspec.structs.replace(self.config, enable_chunked_prefill=False,
                                                max_num_batched_tokens=self.config.max_model_len)
        pf = self.capacity("fcfs prefill-first", prefill_first)
        lowest = min(pf.probes, key=lambda p: p.rate)
        # neither mode meeting the SLO at any probed rate is no evidence either way
        ratio = cap.rate / pf.rate if pf.rate > 0 else math.inf if cap.rate > 0 else math.nan
        self.bench.rows["chunked"] = {"chunked_capacity": cap.rate, "prefill_first_capacity": pf.rate,
                                      "prefill_first_lowest_probe": lowest.rate, "ratio": ratio,
                                      "prefill_first_tbt_p99_at_lowest_probe": lowest.tbt_p99_s}
        self.bench.check("chunked prefill: capacity / prefill-first capacity", ratio, ">= 2.6", ratio >= 2.6,
                         f"prefill-first P99 TBT {lowest.tbt_p99_s * 1e3:.3g} ms at its lowest probe, "
                         f"{lowest.rate:.3g} req/s (SLO {self.slo.tbt_p99_s * 1e3:.3g} ms)")

    def row_reservation(self) -> None:
        inflated = self.options._replace(max_tokens_factor=self.max_tokens_factor)
        modes = {
            "dynamic": (msgspec.structs.replace(self.config, reservation="dynamic"), inflated),
            "conservative": (msgspec.structs.replace(self.config, reservation="conservative"), inflated),
            "oracle": (msgspec.structs.replace(self.config, reservation="conservative"), self.options),
        }
        row: dict[str, Any] = {"max_tokens_factor": self.max_tokens_factor}
        for mode, (cfg, opt) in modes.items():
            sat = summarize_load(self.run("fcfs", self.workload(math.inf, opt), cfg), self.slo)
            cap = self.capacity(f"fcfs {mode} reservation", cfg, opt)
            row[mode] = {"saturated_output_tok_per_s": sat["output_tok_per_s"], "capacity": cap.rate,
                         "retractions": sat["retractions"], "preemptions": sat["preemptions"]}
        n = len(self.trace.rows)
        thr = row["dynamic"]["saturated_output_tok_per_s"] / row["oracle"]["saturated_output_tok_per_s"]
        retract = row["dynamic"]["retractions"] / n
        c = row["conservative"]["capacity"]
        cap_ratio = row["dynamic"]["capacity"] / c if c > 0 else math.inf if row["dynamic"]["capacity"] > 0 else math.nan
        row |= {"throughput_vs_oracle": thr, "retractions_per_request": retract, "capacity_vs_conservative": cap_ratio}
        self.bench.rows["reservation"] = row
        self.bench.check("dynamic reservation: saturated throughput / oracle", thr, ">= 0.95", thr >= 0.95)
        self.bench.check("dynamic reservation: retractions per request", retract, "<= 0.01", retract <= 0.01)
        work = self.workload(math.inf, inflated)
        reserved = statistics.fmean(len(r.prompt) + r.max_new_tokens for r in work)
        used = statistics.fmean(len(r.prompt) + r.output_len for r in work)
        conservative_seqs = self.config.num_pages * self.config.block_size / reserved
        row["footprint_bound"] = reserved / used
        self.bench.check("dynamic reservation: capacity / conservative", cap_ratio, ">= 3", cap_ratio >= 3.0,
                         f"the pool fits ~{conservative_seqs:.0f} conservative reservations against max_num_seqs "
                         f"{self.config.max_num_seqs}; the gain is at most reserved/true footprint = {reserved / used:.2f}x")

    def row_sjf(self) -> None:
        row: dict[str, Any] = {}
        for label in ("0.95x", "1.1x"):
            t = self.bench.per_load.get(label)
            if not t or "fcfs" not in t:
                continue
            fcfs = t["fcfs"]
            bound = 1 / max(1e-9, 1 - fcfs["wait_share"])
            for p in ("sjf", "srtf"):
                if p not in t:
                    continue
                gain = fcfs["e2e_mean"] / t[p]["e2e_mean"]
                tail = t[p]["e2e_p99_longest_decile"] / fcfs["e2e_p99_longest_decile"]
                ceiling = fcfs["e2e_mean"] / t[f"{p}(true)"]["e2e_mean"] if f"{p}(true)" in t else float("nan")
                tau = t[p].get("length_predictor_kendall_tau", float("nan"))
                row[f"{label} {p}"] = {"mean_e2e_gain": gain, "longest_decile_p99_ratio": tail, "kendall_tau": tau,
                                       "fcfs_wait_bound": bound, "oracle_length_gain": ceiling}
                self.bench.check(f"{label} {p}: mean E2E fcfs / {p}", gain, ">= 2.8", gain >= 2.8,
                                 f"fcfs waiting share bound {bound:.3g}x, oracle-length {p} {ceiling:.3g}x, "
                                 f"tau {tau:.2f}")
                self.bench.check(f"{label} {p}: longest-decile P99 E2E / fcfs", tail, "<= 2", tail <= 2.0)
        self.bench.rows["sjf"] = row

    def row_lpm(self) -> None:
        if self.trace.kind != "mooncake":
            return
        work = self.workload(math.inf)
        pages = unique_pages(work, self.config.block_size)
        biggest = max(-(-(len(r.prompt) + r.max_new_tokens) // self.config.block_size) for r in work)
        pool = max(int(self.pool_share * pages), 2 * biggest)  # at least two of the largest requests
        cfg = msgspec.structs.replace(self.config, num_pages=pool)
        ceiling = prefix_hit_ceiling(work, self.config.block_size)
        cap = self.capacity(f"fcfs {self.pool_share:.0%} pool", cfg)
        rate = cap.load_base
        row: dict[str, Any] = {"unique_pages": pages, "pool_pages": pool, "infinite_cache_hit_ceiling": ceiling}
        for load in self.loads:  # --loads: one load is 2 runs, so a device call can take one at a time
            w = self.workload(load * rate)
            res = {p: summarize_load(self.run(p, w, cfg), self.slo) for p in ("fcfs", "lpm")}
            hit = res["lpm"]["prefix_hit_rate"] / ceiling if ceiling > 0 else float("nan")
            ttft = res["fcfs"]["ttft_mean"] / res["lpm"]["ttft_mean"]
            row[f"{load:g}x"] = {p: {k: r[k] for k in ("prefix_hit_rate", "ttft_mean", "ttft_p99", "e2e_mean")}
                                 for p, r in res.items()} | {"hit_vs_ceiling": hit, "ttft_gain": ttft, "rate_rps": load * rate}
            self.bench.check(f"{load:g}x lpm: hit rate / infinite-cache ceiling ({ceiling:.3f})", hit, ">= 0.9",
                             hit >= 0.9, f"fcfs reaches {res['fcfs']['prefix_hit_rate'] / max(ceiling, 1e-9):.3g}")
            self.bench.check(f"{load:g}x lpm: mean TTFT fcfs / lpm", ttft, ">= 2", ttft >= 2.0,
                             f"the ceiling's hit rate {ceiling:.3f} removes at most 1/(1-{ceiling:.2f}) = "
                             f"{1 / (1 - ceiling):.3g}x of the prefill work")
        self.bench.rows["lpm"] = row

    def row_priority(self, cap: Capacity, urgent: float = 0.1) -> None:
        rate = cap.load_base
        rows = self.trace.rows
        k = max(4, len(rows) // 10)
        # Every (n/k)-th row is urgent, so with a trace's own arrivals both streams span its whole time.
        step = max(1, len(rows) // k)
        urgent_at = set(range(0, step * k, step))
        hi_trace = Trace(self.trace.name + "/hi", self.trace.kind, tuple(rows[i] for i in sorted(urgent_at)))
        lo_trace = Trace(self.trace.name + "/lo", self.trace.kind,
                         tuple(r for i, r in enumerate(rows) if i not in urgent_at))
        hi = to_requests(hi_trace, urgent * rate, self.options, prefix="hi-", priority=0)
        end = max(r.arrival for r in hi)
        row: dict[str, Any] = {}
        for low in (1.0, 2.0):
            # The background runs at `low` x capacity for as long as the urgent stream: that can take
            # more requests than the trace's other rows, so they are replayed back to back (each replay
            # its own prompts, and arrivals where the trace has none), cut where the urgent stream ends.
            background: list[SimRequest] = []
            t0 = 0.0
            for c in range(100):
                part = to_requests(lo_trace, low * rate, self.options, prefix=f"lo{c}-", priority=1)
                background += [r for r in (replace(r, arrival=r.arrival + t0) for r in part) if r.arrival <= end]
                t0 += part[-1].arrival
                if t0 > end or part[-1].arrival <= 0:
                    break
            work = sorted(hi + background, key=lambda r: r.arrival)
            span = max((r.arrival for r in background), default=0.0) / end if end > 0 else 1.0
            for policy in ("fcfs", "priority"):
                res = self.run(policy, work, self.config)
                ttft = [r.ttft for r in res.requests if r.priority == 0]
                # With n/10 urgent requests the P95 is one of the slowest few: the median goes beside it.
                row[f"{policy} low {low:g}x"] = {"urgent_ttft_p95": pct(ttft, 95), "urgent_ttft_p50": pct(ttft, 50),
                                                 "background": len(background), "background_span": span,
                                                 "preemptions": res.preemptions}
        rise = row["priority low 2x"]["urgent_ttft_p95"] / row["priority low 1x"]["urgent_ttft_p95"]
        row["rise"] = rise
        self.bench.rows["priority"] = row
        self.bench.check("priority: urgent P95 TTFT, low load 2x / 1x capacity", rise, "<= 1.1", rise <= 1.1,
                         f"fcfs rises {row['fcfs low 2x']['urgent_ttft_p95'] / row['fcfs low 1x']['urgent_ttft_p95']:.3g}x")

    def row_fair(self, cap: Capacity) -> None:
        rate = cap.load_base
        # Interleaved 2:1, so with a trace's own arrivals both tenants send over its whole time.
        rows = self.trace.rows
        a_trace = Trace(self.trace.name + "/A", self.trace.kind, tuple(r for i, r in enumerate(rows) if i % 3 != 2))
        b_trace = Trace(self.trace.name + "/B", self.trace.kind, tuple(r for i, r in enumerate(rows) if i % 3 == 2))
        # 2:1, 1.5x capacity in all: both backlogged
        a = to_requests(a_trace, 1.0 * rate, self.options, prefix="A-", tenant="A")
        b = to_requests(b_trace, 0.5 * rate, self.options, prefix="B-", tenant="B")
        work = sorted(a + b, key=lambda r: r.arrival)
        last = min(max(r.arrival for r in a), max(r.arrival for r in b))
        fair = self.run("fair", work, self.config, trace_every_s=0.5)
        fcfs = self.run("fcfs", work, self.config)
        gap = max((m["fair_counter_gap"] for t, m in fair.trace if t <= last), default=0.0)
        # VTC's bound (Sheng et al., OSDI'24, Thm 4.3, as read here): two backlogged tenants' service
        # differs by at most 2U, U = max(w_in x the longest prompt, w_out x M), M the tokens a running
        # batch can hold (the pool, or max_num_seqs full contexts if smaller); fair.py weighs 1 and 2.
        batch_tokens = min(self.config.num_pages * self.config.block_size,
                           self.config.max_num_seqs * self.config.max_model_len)
        bound = 2 * max(1.0 * max(len(r.prompt) for r in work), 2.0 * batch_tokens)
        # The tighter one-request form, 2 x (prompt + 2 x max_tokens) of the largest request, is reported too.
        tight = 2 * max(len(r.prompt) + 2 * r.max_new_tokens for r in work)
        thr = summarize_load(fair, self.slo)["output_tok_per_s"] / summarize_load(fcfs, self.slo)["output_tok_per_s"]
        self.bench.rows["fair"] = {"max_counter_gap": gap, "vtc_bound": bound, "one_request_bound": tight,
                                   "throughput_vs_fcfs": thr}
        self.bench.check("fair: max service-counter gap while both send / VTC bound", gap / bound, "<= 1",
                         gap <= bound, f"one request's charge x 2 = {tight:.0f}")
        self.bench.check("fair: throughput / fcfs", thr, ">= 0.98", thr >= 0.98)

    def row_adaptive(self) -> None:
        row = {}
        for label, t in self.bench.per_load.items():  # resumed: the tables measured in earlier calls too
            fixed = [p for p in ("fcfs", "sjf", "srtf", "priority") if p in t]
            if "adaptive" not in t or not fixed:
                continue
            best = min(fixed, key=lambda p: t[p]["e2e_mean"])
            worst = max(fixed, key=lambda p: t[p]["e2e_mean"])
            vb = t["adaptive"]["e2e_mean"] / t[best]["e2e_mean"]
            vw = t["adaptive"]["e2e_mean"] / t[worst]["e2e_mean"]
            row[label] = {"best": best, "vs_best": vb, "worst": worst, "vs_worst": vw}
            self.bench.check(f"{label} adaptive: mean E2E / best fixed ({best})", vb, "<= 1.05", vb <= 1.05)
            self.bench.check(f"{label} adaptive: mean E2E / worst fixed ({worst})", vw, "<= 0.9", vw <= 0.9,
                             f"the fixed policies' spread here is {t[worst]['e2e_mean'] / t[best]['e2e_mean']:.3g}x")
        if row:
            self.bench.rows["adaptive"] = row

    def row_overlap(self, cap: Capacity, depth_run: Callable[[int], Run] | None) -> None:
        if depth_run is None:
            self.bench.notes.append("overlap: the simulator runs at depth 1 (one step = one engine step), so it "
                                    "cannot tell depth 2 from 1; that row is for --engine real")
            return
        rate = cap.load_base
        work = self.workload(0.95 * rate)
        row = {}
        for depth in (1, 2):
            r = summarize_load(depth_run(depth)("fcfs", work, self.config), self.slo)
            row[f"depth {depth}"] = {"output_tok_per_s": r["output_tok_per_s"], "tbt_p99": r["tbt_p99"]}
        gain = row["depth 2"]["output_tok_per_s"] / row["depth 1"]["output_tok_per_s"]
        row["throughput_gain"] = gain
        self.bench.rows["overlap"] = row
        self.bench.check("overlap: throughput depth 2 / depth 1", gain, ">= 1.1", gain >= 1.1)

    def run_all(self, rows: Sequence[str] = ROWS, depth_run: Callable[[int], Run] | None = None,
                after: Callable[[Bench], None] = lambda bench: None) -> Bench:
        """The baseline, the per-load table and ``rows``; ``after`` sees the bench once each is done
        (a script saves there, so a run cut short keeps what it measured)."""
        cap = self.baseline()
        self.per_load_table(cap)
        after(self.bench)
        steps: dict[str, Callable[[], None]] = {
            "chunked": lambda: self.row_chunked(cap), "reservation": self.row_reservation, "sjf": self.row_sjf,
            "lpm": self.row_lpm, "priority": lambda: self.row_priority(cap), "fair": lambda: self.row_fair(cap),
            "adaptive": self.row_adaptive, "overlap": lambda: self.row_overlap(cap, depth_run)}
        for name in rows:
            self.bench.start_row(name)
            steps[name]()
            self.progress(f"row {name} done")
            after(self.bench)
        return self.bench


def plot_bench(bench: Bench, out_dir: Any) -> list[Any]:
    """Latency vs load per policy (mean E2E, P99 TBT) and capacity bars per engine mode."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    from pathlib import Path

    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    loads = list(bench.per_load)
    xs = [float(lbl.rstrip("x")) for lbl in loads]
    policies = list(dict.fromkeys(p for t in bench.per_load.values() for p in t))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("e2e_mean", "e2e_p99", "tbt_p99"), ("mean E2E (s)", "P99 E2E (s)", "P99 TBT (s)"),
                              strict=True):
        for i, p in enumerate(policies):  # tab20: twelve lines, twelve colours
            ax.plot(xs, [bench.per_load[lbl][p][key] for lbl in loads], marker="o", lw=1, color=plt.cm.tab20(i),
                    ls="--" if "(true)" in p else "-", label=p)
        if key == "tbt_p99" and bench.slo:
            ax.axhline(bench.slo["tbt_p99_s"], color="grey", ls=":", label="SLO")
        ax.set_xlabel("load (x capacity)")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{bench.trace} ({bench.engine})")
    fig.tight_layout()
    paths.append(out / f"{bench.trace}_{bench.engine}_latency_vs_load.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    modes = list(bench.capacity)
    ax.bar(range(len(modes)), [bench.capacity[m]["rate"] for m in modes])
    ax.set_xticks(range(len(modes)), modes, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("capacity (req/s) under the SLO")
    ax.set_title(f"{bench.trace} ({bench.engine}): capacity by engine mode")
    fig.tight_layout()
    paths.append(out / f"{bench.trace}_{bench.engine}_capacity.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
