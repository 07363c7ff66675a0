"""``conveyor simulate``: compare scheduling policies without a GPU.

The real scheduler, policies and KV bookkeeping run; only the device is replaced, by a step-time
model ``a + b * tokens + c * kv_tokens_read (+ d for a step that prefills)`` seconds (``CostModel``;
the defaults are rough H100 numbers for a ~0.5B model). ``--fit-records FILE`` fits a, b, c, d by
least squares to the step records of a real engine (``scripts/bench_offline.py --step-records FILE``).
Requests stop at an output length drawn by the workload, which only the simulator knows: a policy
sees prompts and ``max_tokens`` as in the engine, so an SJF predictor has to learn lengths from prompts.

    conveyor simulate --workload heavy-tail --load 0.85 --policies fcfs sjf srtf
    conveyor simulate --scenario sjf            # sjf, priority, fair, static, adaptive or all
    conveyor simulate --scenario fair --plot out/
    conveyor simulate --fit-records steps.json --scenario sjf
    conveyor simulate --engine real --model qwen3-0.6b --load-format dummy --scenario sjf --scale 0.05
    conveyor simulate --trace ../shared/traces/sharegpt_8k_lengths.csv   # the trace protocol (its own --help)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from conveyor.runtime.tools.simulator.cost_model import CostModel, fit_cost_model, load_step_records
from conveyor.runtime.tools.simulator.engine import (
    DEFAULT_CONFIG,
    SimConfig,
    measure_capacity,
    simulate,
)
from conveyor.runtime.tools.simulator.report import format_table, summarize
from conveyor.runtime.tools.simulator.scenarios import SCENARIOS, ScenarioContext
from conveyor.runtime.tools.simulator.workloads import (
    WORKLOADS,
    Stream,
    heavy_tail_request,
    make_workload,
    merge_streams,
    mixed_request,
)
from conveyor.scheduler.policies import POLICY_NAMES


def _scenarios(text: str) -> list[str]:
    names = list(SCENARIOS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {', '.join(unknown) or text!r}: "
                                         f"expected {', '.join(SCENARIOS)} or all")
    return names


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT_CONFIG  # (a Struct's class attributes are its field descriptors, not the defaults)
    p = argparse.ArgumentParser(prog="conveyor simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("what to run")
    w.add_argument("--scenario", type=_scenarios, default=None,
                   help=f"the issue's targets, comma-separated ({', '.join(SCENARIOS)}) or all: runs each one's "
                   "workload(s) and policies and checks its target")
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
    w.add_argument("--queue-bound-seqs", type=int, nargs="+", default=[2, 1],
                   help="scenario sjf: max_num_seqs of its queue-bound regimes (adaptive: the first)")
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
    r = p.add_argument_group("real engine (--engine real: the scenarios on EngineCore, wall clock)")
    r.add_argument("--engine", choices=["sim", "real"], default="sim")
    r.add_argument("--model", default="qwen3-0.6b", help="a preset or path, as the engine's --model")
    r.add_argument("--load-format", default="dummy", help="as the engine's (dummy: random weights)")
    r.add_argument("--device", default="auto")
    r.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV pool (default: the engine's)")
    r.add_argument("--pipeline-depth", type=int, default=2)
    r.add_argument("--output-scale", type=float, default=0.25,
                   help="real engine: multiply every output length (and max_tokens) by this, keeping the shape")
    r.add_argument("--step-records", type=Path, default=None, metavar="FILE",
                   help="real engine: write every step's StepRecord here (a file --fit-records reads)")
    c = p.add_argument_group("step-time model")
    cost = c.add_mutually_exclusive_group()
    cost.add_argument("--cost", type=CostModel.parse, default=None, metavar="A,B,C[,D]",
                      help="step seconds = A + B * tokens + C * kv tokens read (+ D if it prefills) (default: "
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--trace" in argv:  # the trace protocol (issue #23) has flags of its own: scripts/bench_traces.py
        from conveyor.runtime.tools.simulator.trace_cli import main as trace_main

        return trace_main(argv)
    args = build_parser().parse_args(argv)
    cost = args.cost or CostModel()
    if args.fit_records is not None:
        records = load_step_records(args.fit_records)
        cost = fit_cost_model(records)
        print(f"fitted cost model from {len(records)} steps: a = {cost.base_s * 1e3:.4g} ms, "
              f"b = {cost.per_token_s * 1e6:.4g} us/token, c = {cost.per_kv_token_s * 1e9:.4g} ns/kv-token, "
              f"d = {cost.per_prefill_step_s * 1e3:.4g} ms/prefill step, R^2 = {cost.r_squared(records):.4f}")
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
        ctx = ScenarioContext(config, args.seed, args.scale, args.plot, tuple(args.queue_bound_seqs))
        if args.engine == "real":
            from conveyor.runtime.engine.config import EngineConfig
            from conveyor.runtime.tools.simulator.real import RealRunner

            base = EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                                kv_cache_memory=args.kv_cache_memory, pipeline_depth=args.pipeline_depth,
                                max_model_len=None)  # the model's own: the sim's 4096 may exceed it
            ctx.real = RealRunner(base, args.output_scale)
        names = args.scenario
        missed = 0
        for name in names:
            rep = SCENARIOS[name](ctx)
            print(rep.render(), end="\n\n", flush=True)
            missed += sum(not c.ok for c in rep.checks)
            out[name] = {"notes": rep.notes, "tables": rep.tables, "checks": [c._asdict() for c in rep.checks]}
        print(f"{missed} target(s) missed" if missed else "all targets met")
        if ctx.real is not None and args.step_records is not None:
            args.step_records.write_text(json.dumps([r._asdict() for r in ctx.real.step_records]))
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
