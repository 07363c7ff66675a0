"""Scheduling quality on public traces (issue #23): capacity under a P99-TBT SLO, every policy at
0.5/0.8/0.95/1.1x of it, and each technique's target row, in the simulator or on the real engine.

    python scripts/bench_traces.py --trace ../shared/traces/sharegpt_8k_lengths.csv --limit 300 --out out/
    conveyor simulate --trace ../shared/traces/azure_llm_2023_code.csv --rows chunked   # the same command
    python scripts/bench_traces.py --trace tests/data/traces/azure_code_slice.csv --rows chunked --policy fcfs
    python scripts/bench_traces.py --engine real --model qwen3-0.6b --load-format dummy --device cuda \\
        --trace ../shared/traces/sharegpt_8k_lengths.csv --limit 300 --out out/h200/
    python scripts/bench_traces.py ... --resume out/h200/sharegpt_8k_lengths_real.json --policy --rows reservation

Writes ``<out>/<trace>_<engine>.json`` and plots (latency vs load per policy, capacity bars). With
``--engine real`` it also fits the step-time model to the real run's step records and replays the
per-load fcfs runs in the simulator with it: ``sim_vs_real`` in the JSON is the mean-E2E ratio per load.
The protocol itself is ``conveyor.runtime.tools.simulator.trace_bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conveyor.runtime.tools.simulator.cost_model import (
    CostModel,
    fit_cost_model,
    load_step_records,
    save_step_records,
)
from conveyor.runtime.tools.simulator.trace_bench import LOADS, ROWS, TRACE_CONFIG, Bench, Protocol, plot_bench
from conveyor.runtime.tools.simulator.traces import TraceOptions, load_trace
from conveyor.scheduler.policies import POLICY_NAMES


def build_parser() -> argparse.ArgumentParser:
    d = TRACE_CONFIG
    p = argparse.ArgumentParser(prog="bench_traces.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, nargs="+", required=True, help="trace files (format told by the header)")
    p.add_argument("--limit", type=int, default=300, help="rows of each trace (0: all)")
    p.add_argument("--offset", type=int, default=0, help="first row")
    p.add_argument("--policy", nargs="*", default=list(POLICY_NAMES), choices=POLICY_NAMES,
                   help="policies of the per-load table (none: only the rows, e.g. with --resume)")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS,
                   help="target rows to measure (none: the baseline and per-load table only)")
    p.add_argument("--loads", type=float, nargs="+", default=list(LOADS), help="multiples of the capacity")
    p.add_argument("--iters", type=int, default=7, help="binary-search halvings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-tokens", type=int, default=64,
                   help="Mooncake: tokens one 512-token hash block becomes (input lengths x block_tokens/512)")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply every prompt and output length (a small model's context: e.g. 0.1)")
    p.add_argument("--max-tokens-factor", type=float, default=6.0,
                   help="reservation row: max_tokens = this x the true mean output")
    p.add_argument("--pool-share", type=float, default=0.25, help="lpm row: KV pool / the trace's unique pages")
    e = p.add_argument_group("engine limits")
    e.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    e.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    e.add_argument("--max-model-len", type=int, default=d.max_model_len)
    e.add_argument("--num-pages", type=int, default=d.num_pages, help="simulator: KV pages in the pool")
    e.add_argument("--block-size", type=int, default=d.block_size)
    c = p.add_argument_group("step-time model (simulator)")
    cost = c.add_mutually_exclusive_group()
    cost.add_argument("--cost", type=CostModel.parse, default=None, metavar="A,B,C[,D]")
    cost.add_argument("--fit-records", type=Path, default=None, metavar="FILE",
                      help="fit the cost model to these StepRecords (e.g. a real run's --step-records)")
    r = p.add_argument_group("real engine (--engine real: RealRunner on EngineCore, wall clock)")
    r.add_argument("--engine", choices=["sim", "real"], default="sim")
    r.add_argument("--model", default="qwen3-0.6b")
    r.add_argument("--load-format", default="dummy")
    r.add_argument("--device", default="auto")
    r.add_argument("--kv-cache-memory", type=int, default=None,
                   help="bytes for the KV pool (the real engine's; with --no-match-pool)")
    r.add_argument("--match-pool", action=argparse.BooleanOptionalAction, default=True,
                   help="real: give the engine the simulated pool's page count (--num-pages; the lpm row's 25%% "
                   "pool), so both engines run on one pool; off: the pool the device's memory sizes")
    r.add_argument("--pipeline-depth", type=int, default=2)
    r.add_argument("--step-records", type=Path, default=None,
                   help="real: write every step's StepRecord here (gzipped if the name ends in .gz)")
    p.add_argument("--resume", type=Path, default=None, metavar="JSON",
                   help="go on from an earlier run's JSON of this trace, slice and engine (one trace): its SLO, "
                   "capacity, per-load table and rows stand, but for the --policy and --rows measured again")
    p.add_argument("--out", type=Path, default=Path("bench_traces_out"))
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv=None) -> int:
    import msgspec

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None and len(args.trace) != 1:
        parser.error("--resume goes on from one trace's JSON: give one --trace")
    prior = json.loads(args.resume.read_text()) if args.resume is not None else None
    cost = args.cost or TRACE_CONFIG.cost
    if args.fit_records is not None:
        cost = fit_cost_model(load_step_records(args.fit_records))
    config = msgspec.structs.replace(
        TRACE_CONFIG, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, num_pages=args.num_pages, block_size=args.block_size, cost=cost)
    options = TraceOptions(block_tokens=args.block_tokens, length_scale=args.length_scale, seed=args.seed)
    run = depth_run = runner = None
    engine_config = {}
    if args.engine == "real":
        from conveyor.runtime.engine.config import EngineConfig
        from conveyor.runtime.tools.simulator.real import RealRunner

        base = EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                            kv_cache_memory=args.kv_cache_memory, pipeline_depth=args.pipeline_depth,
                            max_model_len=args.max_model_len)
        # lengths are scaled by --length-scale, prompts too, so no output_scale here
        engine_config = {k: getattr(base, k) for k in ("model", "load_format", "device", "pipeline_depth")}
        runner = RealRunner(base, output_scale=1.0, match_pool=args.match_pool)
        run = runner

        def depth_run(depth):
            return RealRunner(msgspec.structs.replace(base, pipeline_depth=depth), output_scale=1.0,
                              match_pool=args.match_pool)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.trace:
        trace = load_trace(path, limit=args.limit or None, offset=args.offset)
        proto = Protocol(trace, config, options, engine=args.engine, policies=args.policy, loads=args.loads,
                         iters=args.iters, max_tokens_factor=args.max_tokens_factor, pool_share=args.pool_share,
                         progress=lambda s, n=trace.name: print(f"[{n}] {s}", flush=True),
                         engine_config=engine_config, **({"run": run} if run is not None else {}))
        if prior is not None:
            proto.resume(prior)
            proto.bench.notes.append(f"resumed from {args.resume}; this call measured: per-load "
                                     f"{', '.join(args.policy) or 'none'}, rows {', '.join(args.rows) or 'none'}")
        stem = args.out / f"{trace.name}_{args.engine}"
        command = "python scripts/bench_traces.py " + " ".join(sys.argv[1:] if argv is None else argv)

        def save(bench: Bench) -> dict:  # after each row too: a run cut short keeps what it measured
            out = bench.to_builtins()
            # fitted to the steps of the per-load fcfs runs it replays: a resumed run's own only if it ran them
            if runner is not None and "fcfs" in args.policy and bench.per_load:
                out["sim_vs_real"] = sim_vs_real(proto, runner)
            elif prior is not None and "sim_vs_real" in prior:
                out["sim_vs_real"] = prior["sim_vs_real"]
            stem.with_suffix(".json").write_text(json.dumps(out, indent=2, default=float))
            stem.with_suffix(".md").write_text(markdown(out, command))
            if runner is not None and args.step_records is not None:
                save_step_records(runner.step_records, args.step_records)
            return out

        bench = proto.run_all(args.rows, depth_run, after=save)
        out = save(bench)
        if not args.no_plot:
            plot_bench(bench, args.out)
        print_bench(out)
    return 0


def sim_vs_real(proto: Protocol, runner) -> dict:
    """The per-load fcfs runs replayed in the simulator with the cost model fitted to the real run's steps."""
    import msgspec

    from conveyor.runtime.tools.simulator.capacity import summarize_load
    from conveyor.runtime.tools.simulator.engine import simulate

    fitted = fit_cost_model(runner.step_records)
    cfg = msgspec.structs.replace(proto.config, cost=fitted)
    rate = proto.bench.capacity_of("fcfs").load_base
    out = {"fitted_cost": msgspec.to_builtins(fitted), "r_squared": fitted.r_squared(runner.step_records)}
    for load in proto.loads:
        sim = summarize_load(simulate("fcfs", proto.workload(load * rate), cfg), proto.slo)
        real = proto.bench.per_load[f"{load:g}x"]["fcfs"]
        out[f"{load:g}x"] = {"sim_e2e_mean": sim["e2e_mean"], "real_e2e_mean": real["e2e_mean"],
                             "sim_over_real": sim["e2e_mean"] / real["e2e_mean"]}
    return out


def _rate(row: dict) -> str:
    # a JSON written before the rate was recorded has none
    return f" ({row['rate_rps']:.3g} req/s)" if "rate_rps" in row else ""


def markdown(out: dict, command: str) -> str:
    """The README's table for one trace: capacity per mode, every policy at each load, the targets."""
    lines = [f"`{command}`", "", *out["notes"], "",
             "capacity (req/s under the SLO): " + ", ".join(f"{m} **{c['rate']:.3g}**" for m, c in out["capacity"].items()),
             "", "| load | policy | mean E2E s | P99 E2E s | P99 TTFT s | P99 TBT ms | goodput req/s | preemptions |",
             "|---|---|---|---|---|---|---|---|"]
    for label, table in out["per_load"].items():
        for p, r in table.items():
            lines.append(f"| {label}{_rate(r)} | {p} | {r['e2e_mean']:.3g} | {r['e2e_p99']:.3g} | {r['ttft_p99']:.3g} | "
                         f"{r['tbt_p99'] * 1e3:.3g} | {r['goodput_rps']:.3g} | {r['preemptions']:.0f} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {c['name']} (target {c['target']}) | {c['value']:.3g} | {'yes' if c['ok'] else '**no**'} |"
              for c in out["checks"]]
    return "\n".join(lines) + "\n"


def print_bench(out: dict) -> None:
    print(f"\n=== {out['trace']} ({out['kind']}, {out['engine']}) ===")
    for note in out["notes"]:
        print(note)
    print("capacity (req/s): " + ", ".join(f"{m} {c['rate']:.4g}" for m, c in out["capacity"].items()))
    keys = ("e2e_mean", "e2e_p99", "ttft_p99", "tbt_p99", "goodput_rps", "preemptions")
    for label, table in out["per_load"].items():
        print(f"-- {label} capacity{_rate(next(iter(table.values()), {}))}")
        print(f"{'policy':14}" + "".join(f"{k:>13}" for k in keys))
        for p, row in table.items():
            print(f"{p:14}" + "".join(f"{row[k]:>13.4g}" for k in keys))
    print("targets:")
    for c in out["checks"]:
        print(f"  [{'ok' if c['ok'] else 'MISS'}] {c['name']}: {c['value']:.3g} (target {c['target']})")
    if "sim_vs_real" in out:
        print("sim vs real mean E2E: " + ", ".join(
            f"{k} {v['sim_over_real']:.3f}" for k, v in out["sim_vs_real"].items() if isinstance(v, dict)
            and "sim_over_real" in v))

