"""``conveyor compare`` / ``scripts/compare_strategies.py``: four ways to serve one workload, side by side.

The strategies are real engines with real scheduler policies, run one after another in this
process on the same requests (one engine alive at a time, so one GPU is enough):

- ``fifo``: one request at a time, to completion (policy ``fifo``), no overlap;
- ``static``: fixed batches of ``--static-batch-size`` that run until their longest output ends,
  nothing admitted meanwhile (policy ``static``), no overlap;
- ``cb``: continuous batching (policy ``fcfs``), pipeline depth 1 (no overlap);
- ``cb-overlap``: the same with the CPU scheduling batch N+1 while the device runs N (depth 2).

Each step changes one thing: batching, then continuous admission, then overlap. Every batching
strategy gets the same cap (``--max-num-seqs``; static's batch size defaults to it), so they hold
the same number of requests at most and differ only in when they admit them.

Latency counts from a request's arrival (all at t=0 by default, or Poisson at ``--request-rate``)
to its first token (TTFT) or its last (E2E). Padding waste is the share of the token slots a
padded static batcher computes that are padding: each prompt padded to its batch's longest, each
row kept running until the batch's longest output ends (the ``static`` policy counts this; Conveyor
itself never computes padding, so ``static`` measures a static batcher at its best: it loses only
the slots its finished rows leave empty). FIFO (a batch of one) and continuous batching (ragged
batches) have none. Device busy is the time the device (on CPU: the executor's worker) ran batches, over
the wall time of the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import numpy as np
from tqdm import tqdm

from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine_args import add_engine_args, engine_config, parse_range
from conveyor.runtime.tools.driver import replay, run_until_idle

if TYPE_CHECKING:
    from conveyor.runtime.engine.core import EngineCore
    from conveyor.scheduler import Request


class Strategy(NamedTuple):
    policy: str
    pipeline_depth: int  # 0: the overlap depth (--pipeline-depth, at least 2)
    label: str


STRATEGIES: dict[str, Strategy] = {
    "fifo": Strategy("fifo", 1, "FIFO, one at a time"),
    "static": Strategy("static", 1, "static batching"),
    "cb": Strategy("fcfs", 1, "continuous, no overlap"),
    "cb-overlap": Strategy("fcfs", 0, "continuous + overlap"),
}


class WorkloadSpec(msgspec.Struct, kw_only=True):
    name: str
    num_prompts: int
    input_len: tuple[int, int]  # uniform LO:HI; with a lengths file, the range its rows span
    output_len: tuple[int, int]
    seed: int
    request_rate: float | None  # requests/s, Poisson; None: every request arrives at t=0
    lengths_file: str | None = None  # (prompt, output) rows taken in file order, repeated to num_prompts


WORKLOADS: dict[str, WorkloadSpec] = {
    # Mixed lengths: short and long requests share batches, which is where static batching loses.
    "mixed": WorkloadSpec(name="mixed", num_prompts=64, input_len=(8, 512), output_len=(8, 512), seed=0,
                          request_rate=None),
    # W1 (DESIGN.md), as scripts/bench_offline.py draws it: the same token ids for the same seed.
    "w1": WorkloadSpec(name="w1", num_prompts=256, input_len=(100, 1024), output_len=(100, 1024), seed=0,
                       request_rate=None),
}


class WorkItem(NamedTuple):
    index: int
    prompt_ids: list[int]
    output_len: int
    arrival_s: float  # offset from the start of the run


class RequestMetrics(msgspec.Struct, kw_only=True):
    index: int
    prompt_tokens: int
    output_tokens: int
    arrival_s: float  # the times are seconds from the start of the run
    first_token_s: float
    finish_s: float

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


class StrategyResult(msgspec.Struct, kw_only=True):
    strategy: str
    label: str
    schedule_policy: str
    pipeline_depth: int
    num_requests: int  # fewer than the workload's when --fifo-max-requests capped FIFO
    wall_s: float  # first arrival to last finish
    output_tokens: int
    output_throughput: float  # tok/s
    request_throughput: float  # req/s
    mean_e2el_ms: float
    p95_e2el_ms: float
    p95_ttft_ms: float
    padding_waste: float  # 0-1, see the module docstring
    device_busy_s: float
    device_busy_fraction: float  # device busy / wall
    steps: int  # batches the engine ran
    max_batch_seqs: int  # the most requests one batch held
    preemptions: int
    requests: list[RequestMetrics]


class CompareResult(msgspec.Struct, kw_only=True):
    date: str
    model: str
    device: str
    workload: WorkloadSpec
    max_num_seqs: int
    static_batch_size: int
    results: list[StrategyResult]


# -- the workload ---------------------------------------------------------------------------
def read_lengths(path: Path, n: int | None) -> list[tuple[int, int]]:
    """(prompt, output) tokens per request from a CSV/JSONL length mix, in file order, repeated to ``n``."""
    from conveyor.runtime.tools.loadgen.arrivals import read_length_rows

    rows = [(max(r.prompt_tokens, 1), max(r.output_tokens, 1)) for r in read_length_rows(path, with_time=False)]
    return [rows[i % len(rows)] for i in range(n or len(rows))]


def build_workload(spec: WorkloadSpec, vocab_size: int) -> list[WorkItem]:
    """Random token ids; the draws follow scripts/bench_offline.py's, so W1 is the same there and here."""
    from conveyor.runtime.tools.loadgen.arrivals import arrival_offsets

    rng = random.Random(spec.seed)
    rate = math.inf if spec.request_rate is None else spec.request_rate
    offsets = arrival_offsets(spec.num_prompts, rate, seed=spec.seed)
    fixed = read_lengths(Path(spec.lengths_file), spec.num_prompts) if spec.lengths_file else None
    items = []
    for i in range(spec.num_prompts):
        n_in, n_out = fixed[i] if fixed else (rng.randint(*spec.input_len), rng.randint(*spec.output_len))
        items.append(WorkItem(i, [rng.randrange(vocab_size) for _ in range(n_in)], n_out, offsets[i]))
    return items


# -- one strategy ---------------------------------------------------------------------------
def strategy_config(base: EngineConfig, name: str) -> EngineConfig:
    s = STRATEGIES[name]
    depth = s.pipeline_depth or max(2, base.pipeline_depth)
    return msgspec.structs.replace(base, schedule_policy=s.policy, pipeline_depth=depth)


def _padding_counters(core: EngineCore) -> tuple[int, int]:
    from conveyor.scheduler.policies import StaticBatchPolicy

    policy = core.scheduler.policy
    if isinstance(policy, StaticBatchPolicy):
        return policy.padding_tokens, policy.useful_tokens
    return 0, 0


def warm_up(core: EngineCore, items: list[WorkItem], n: int, temperature: float) -> None:
    """A few short requests, untimed: first-call costs (kernel plans, allocator) stay out of the numbers."""
    from conveyor.scheduler import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True)
    vocab = core.model_info.vocab_size
    # Every id shifted by one: no prompt of the run starts like a warm-up prompt, so the prefix
    # cache cannot serve the timed run anything the warm-up computed.
    run_until_idle(core, [core.inputs.make_request([(t + 1) % vocab for t in item.prompt_ids[:32]], params,
                                                   request_id=f"warmup-{item.index}") for item in items[:n]])


def _drive(core: EngineCore, items: list[WorkItem], temperature: float,
           progress: str | None) -> tuple[list[Request], float]:
    """Feed each request at its arrival offset and step until all finish; the requests and the start time."""
    from conveyor.scheduler import SamplingParams

    def make_request(item: WorkItem, t0: float) -> Request:
        params = SamplingParams(temperature=temperature, max_tokens=item.output_len, ignore_eos=True)
        req = core.inputs.make_request(item.prompt_ids, params, request_id=str(item.index))
        # Latency counts from when the request arrived, not from when the loop got to it (a step may
        # have been running then).
        req.arrival_time = t0 + item.arrival_s
        return req

    bar = tqdm(total=len(items), desc=progress, unit="req", disable=progress is None, dynamic_ncols=True)
    try:
        return replay(core, items, lambda it: it.arrival_s, make_request,
                      after_step=lambda outs: bar.update(sum(out.finished for out in outs)))
    finally:
        bar.close()


def run_strategy(name: str, base: EngineConfig, items: list[WorkItem], *, warmup: int = 2,
                 temperature: float = 0.0, progress: bool = False) -> StrategyResult:
    """One engine for one strategy, on ``items``; the engine is closed and freed before this returns."""
    from conveyor.runtime.build import build_engine, release_device_memory

    config = strategy_config(base, name)
    core = build_engine(config)
    try:
        warm_up(core, items, warmup, temperature)
        busy0, pad0, preempted0 = core.stats().device_busy_s, _padding_counters(core), core.scheduler.num_preemptions
        core.step_records = []
        reqs, t0 = _drive(core, items, temperature, name if progress else None)
        records, core.step_records = core.step_records, None
        busy = core.stats().device_busy_s - busy0
        pad1 = _padding_counters(core)
        preemptions = core.scheduler.num_preemptions - preempted0
        core.check_integrity()
    finally:
        core.close()
        del core  # free the model, KV pool and graphs before the next strategy builds its own
        release_device_memory()
    padding, useful = pad1[0] - pad0[0], pad1[1] - pad0[1]
    metrics = [
        RequestMetrics(index=int(r.request_id), prompt_tokens=r.num_prompt_tokens,
                       output_tokens=len(r.output_token_ids), arrival_s=r.arrival_time - t0,
                       first_token_s=r.first_token_time - t0, finish_s=r.finish_time - t0)
        for r in sorted(reqs, key=lambda r: int(r.request_id))
    ]
    wall = max(m.finish_s for m in metrics) - min(m.arrival_s for m in metrics)
    e2e_ms = np.array([m.e2e_s for m in metrics]) * 1000
    ttft_ms = np.array([m.ttft_s for m in metrics]) * 1000
    n_out = sum(m.output_tokens for m in metrics)
    return StrategyResult(
        strategy=name, label=STRATEGIES[name].label, schedule_policy=config.schedule_policy,
        pipeline_depth=config.pipeline_depth, num_requests=len(metrics), wall_s=wall, output_tokens=n_out,
        output_throughput=n_out / wall, request_throughput=len(metrics) / wall,
        mean_e2el_ms=float(e2e_ms.mean()), p95_e2el_ms=float(np.percentile(e2e_ms, 95)),
        p95_ttft_ms=float(np.percentile(ttft_ms, 95)),
        padding_waste=padding / (padding + useful) if padding + useful else 0.0,
        device_busy_s=busy, device_busy_fraction=busy / wall, steps=len(records),
        max_batch_seqs=max((r.num_seqs for r in records), default=0), preemptions=preemptions, requests=metrics,
    )


# -- output ---------------------------------------------------------------------------------
ROWS: list[tuple[str, str, str]] = [  # (field, row title, format)
    ("output_throughput", "Output throughput (tok/s)", "{:,.1f}"),
    ("request_throughput", "Request throughput (req/s)", "{:.3f}"),
    ("mean_e2el_ms", "Mean E2E latency (ms)", "{:,.0f}"),
    ("p95_e2el_ms", "P95 E2E latency (ms)", "{:,.0f}"),
    ("p95_ttft_ms", "P95 TTFT (ms)", "{:,.0f}"),
    ("padding_waste", "Padding waste", "{:.1%}"),
    ("device_busy_fraction", "Device busy", "{:.1%}"),
    ("steps", "Steps", "{:,}"),
    ("max_batch_seqs", "Max requests per step", "{:,}"),
    ("num_requests", "Requests", "{:,}"),
]


def format_table(res: CompareResult) -> str:
    w = res.workload
    arrivals = "all at t=0" if w.request_rate is None else f"Poisson {w.request_rate:g} req/s"
    head = (f"{w.name}: {w.num_prompts} requests, prompt {w.input_len[0]}-{w.input_len[1]}, output "
            f"{w.output_len[0]}-{w.output_len[1]} tokens, {arrivals}; {res.model} on {res.device}; "
            f"batch cap {res.max_num_seqs}, static batch {res.static_batch_size}")
    width = max(14, *(len(r.strategy) + 2 for r in res.results))
    lines = [head, "", f"{'':<28}" + "".join(f"{r.strategy:>{width}}" for r in res.results)]
    for field, title, fmt in ROWS:
        lines.append(f"{title:<28}" + "".join(f"{fmt.format(getattr(r, field)):>{width}}" for r in res.results))
    by_name = {r.strategy: r for r in res.results}
    for a, b, what in (("cb", "static", "continuous vs static"), ("cb-overlap", "cb", "overlap vs no overlap")):
        if a in by_name and b in by_name:
            ra, rb = by_name[a], by_name[b]
            lines.append(f"{what}: {ra.output_throughput / rb.output_throughput:.2f}x output tok/s, "
                         f"{ra.p95_e2el_ms / rb.p95_e2el_ms:.2f}x p95 E2E")
    fifo = by_name.get("fifo")
    if fifo is not None and fifo.num_requests < w.num_prompts:
        lines.append(f"fifo ran only the first {fifo.num_requests} of {w.num_prompts} requests "
                     "(--fifo-max-requests): its throughput is comparable, its latencies are those of a "
                     "shorter queue and so understate the full workload's")
    lines.append("Padding waste: share of a padded static batcher's token slots that are padding (prompts "
                 "padded to the batch's longest, rows run until its longest output ends); ragged batches have none.")
    return "\n".join(lines)


def write_plot(res: CompareResult, path: Path) -> Path:
    """Bar charts, one panel per metric, one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.strategy for r in res.results]
    colors = [f"C{list(STRATEGIES).index(n)}" for n in names]
    panels = [
        ("Output throughput (tok/s)", [r.output_throughput for r in res.results]),
        ("Request throughput (req/s)", [r.request_throughput for r in res.results]),
        ("Mean E2E latency (s)", [r.mean_e2el_ms / 1000 for r in res.results]),
        ("P95 E2E latency (s)", [r.p95_e2el_ms / 1000 for r in res.results]),
        ("P95 TTFT (s)", [r.p95_ttft_ms / 1000 for r in res.results]),
        ("Padding waste (%)", [100 * r.padding_waste for r in res.results]),
        ("Device busy (%)", [100 * r.device_busy_fraction for r in res.results]),
        ("Steps", [r.steps for r in res.results]),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (title, values) in zip(axes.flat, panels):
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    w = res.workload
    fig.suptitle(f"{w.name}: {w.num_prompts} requests on {res.model} ({res.device}), batch cap {res.max_num_seqs}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the command line -----------------------------------------------------------------------
def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conveyor compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=list(WORKLOADS), default="mixed",
                   help="mixed: 64 requests, prompt and output 8-512 tokens; w1: bench_offline's W1 (256 requests, "
                   "100-1024 each); the flags below override either (default: mixed)")
    w.add_argument("--num-prompts", type=int, default=None)
    w.add_argument("--input-len", type=parse_range, default=None, help="prompt tokens LO:HI, uniform")
    w.add_argument("--output-len", type=parse_range, default=None, help="output tokens LO:HI, uniform (EOS ignored)")
    w.add_argument("--lengths-file", type=Path, default=None,
                   help="CSV/JSONL rows of prompt_tokens,output_tokens (e.g. a ShareGPT length mix), used in file "
                   "order and repeated up to --num-prompts (default: all rows once); replaces the length ranges")
    w.add_argument("--workload-seed", type=int, default=None, help="(default: the workload's, 0)")
    w.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals at this many requests/s (default: all arrive at t=0)")
    w.add_argument("--temperature", type=float, default=0.0)
    r = p.add_argument_group("run")
    r.add_argument("--strategies", type=parse_strategies, default=list(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)} (default: all)")
    r.add_argument("--fifo-max-requests", type=int, default=None,
                   help="FIFO runs only the first N requests (one at a time is slow); the table says so")
    r.add_argument("--warmup", type=int, default=2, help="short untimed requests per engine first (default: 2)")
    r.add_argument("--result-json", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None, help="PNG of bar charts, one panel per metric")
    r.add_argument("--from-json", type=Path, default=None,
                   help="run nothing: print the table (and --plot) of an earlier --result-json")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_engine_args(p)
    # One cap for every batching strategy, modest by default: with a cap as large as the workload,
    # static and continuous batching admit everything at once and look alike.
    p.set_defaults(max_num_seqs=32, static_batch_size=None, max_model_len=None)
    for action in p._actions:
        if action.dest == "max_num_seqs":
            action.help = "the batch cap every batching strategy shares (default: 32)"
        elif action.dest == "static_batch_size":
            action.help = "static: requests per fixed batch (default: --max-num-seqs)"
        elif action.dest == "max_model_len":
            action.help = "(default: the workload's longest prompt + output)"
        elif action.dest in ("schedule_policy", "pipeline_depth"):
            action.help = "set per strategy; --pipeline-depth 3 makes cb-overlap use depth 3"
    return p


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    base = WORKLOADS[args.workload]
    seed = base.seed if args.workload_seed is None else args.workload_seed
    if args.lengths_file is not None:
        lengths = read_lengths(args.lengths_file, args.num_prompts)
        prompts, outputs = [p for p, _ in lengths], [o for _, o in lengths]
        return WorkloadSpec(name=args.lengths_file.name, num_prompts=len(lengths),
                            input_len=(min(prompts), max(prompts)), output_len=(min(outputs), max(outputs)),
                            seed=seed, request_rate=args.request_rate, lengths_file=str(args.lengths_file))
    return WorkloadSpec(
        name=args.workload, num_prompts=args.num_prompts or base.num_prompts,
        input_len=args.input_len or base.input_len, output_len=args.output_len or base.output_len,
        seed=seed, request_rate=args.request_rate,
    )


def run_compare(argv: Sequence[str] | None = None) -> CompareResult:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:  # e.g. plot here what a GPU machine without matplotlib measured
        res = msgspec.json.decode(args.from_json.read_bytes(), type=CompareResult)
        print(format_table(res), flush=True)
        if args.plot is not None:
            write_plot(res, args.plot)
        return res
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Say so before the runs, not after minutes of them; the JSON can be plotted elsewhere.
        raise ValueError("--plot needs matplotlib; write --result-json here and plot it with --from-json "
                         "where matplotlib is installed")
    spec = workload_spec(args)
    if args.max_model_len is None:
        args.max_model_len = spec.input_len[1] + spec.output_len[1]
    if args.static_batch_size is None:
        args.static_batch_size = args.max_num_seqs
    base = engine_config(args)

    from conveyor.model import resolve_model
    from conveyor.runtime.worker.worker import resolve_device

    items = build_workload(spec, resolve_model(base.model, base.load_format).config.vocab_size)
    results = []
    for name in args.strategies:
        todo = items[: args.fifo_max_requests] if name == "fifo" and args.fifo_max_requests else items
        results.append(run_strategy(name, base, todo, warmup=args.warmup, temperature=args.temperature,
                                    progress=args.progress))
    res = CompareResult(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model=resolve_model(base.model, base.load_format).name, device=str(resolve_device(base)), workload=spec,
        max_num_seqs=base.max_num_seqs, static_batch_size=base.static_batch_size, results=results,
    )
    print(format_table(res), flush=True)
    if args.result_json is not None:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_bytes(msgspec.json.format(msgspec.json.encode(res), indent=2))
    if args.plot is not None:
        write_plot(res, args.plot)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run_compare(argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, msgspec.DecodeError) as e:  # what the user can fix: say it, no trace
        print(f"conveyor compare: error: {e}", file=sys.stderr)
        return 2
    return 0
