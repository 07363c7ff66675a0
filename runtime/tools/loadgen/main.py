"""``conveyor loadgen`` / ``scripts/loadgen.py``: flags -> workload and arrivals -> runs -> table, JSON, PNGs."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgspec

from conveyor.runtime.engine_args import parse_range
from conveyor.runtime.tools.loadgen import arrivals, workloads
from conveyor.runtime.tools.loadgen.client import (
    RequestOptions,
    RequestRecord,
    first_model,
    send_completion,
    wait_ready,
)
from conveyor.runtime.tools.loadgen.report import RunResult, format_table, parse_slo, summarize
from conveyor.runtime.tools.loadgen.runner import run_load

WORKLOADS = ("random", "lengths", *workloads.PRESETS)


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate or comma-separated rates: {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive (or inf): {text!r}")
    return rates


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conveyor loadgen",
        description="Streaming load against an OpenAI-compatible /v1/completions or /v1/chat/completions endpoint "
        "(Conveyor, vLLM, SGLang): TTFT, TPOT, ITL, E2E percentiles, goodput under SLOs, JSON and plots.")
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    t.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions (a prompt) or /v1/chat/completions (the prompt as one user message; "
                   "the server's chat template adds a few prompt tokens) (default: %(default)s)")
    t.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    t.add_argument("--tokenizer", type=Path, default=None,
                   help="the served model's tokenizer directory, so prompt lengths are exact in its tokens "
                   "(default: words stand in for tokens)")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    t.add_argument("--api-key", default=None,
                   help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY, else none)")
    t.add_argument("--extra-body", type=parse_json_object, default=None,
                   help="JSON object merged into every request body, e.g. '{\"top_k\": 20}'")
    t.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for the server to answer /v1/models before starting (default: 600)")
    t.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent (one at a time, not measured) before each run (default: 0)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="random: --input-len/--output-len ranges; lengths: rows of --lengths-file; "
                   "chat / rag / batch: presets (default: random)")
    w.add_argument("--num-prompts", type=int, default=None, help="requests per run (default: 1000, or the preset's)")
    w.add_argument("--input-len", type=parse_range, default=None, help="prompt tokens LO:HI, uniform "
                   "(default: 100:1024, or the preset's)")
    w.add_argument("--output-len", type=parse_range, default=None, help="output tokens LO:HI, uniform "
                   "(default: 100:1024, or the preset's)")
    w.add_argument("--lengths-file", type=Path, default=None,
                   help="CSV/JSONL with prompt_tokens,output_tokens rows (e.g. ShareGPT's), sampled with replacement")
    w.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length (vLLM's flag)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default: 0)")
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", type=parse_rates, default=None,
                   help="requests/s, Poisson; several comma-separated rates run one after another as a sweep; "
                   "inf sends all at once (default: inf, or the preset's)")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival gaps: 1 Poisson, <1 burstier, >1 steadier (default: 1)")
    a.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    a.add_argument("--trace", type=Path, default=None,
                   help="replay a CSV/JSONL trace: arrival_s (or timestamp), prompt_tokens, output_tokens per row")
    a.add_argument("--trace-speed", type=float, default=1.0, help="replay the trace this many times faster")
    a.add_argument("--duration", type=float, default=None, help="stop sending new requests after this many seconds")
    o = p.add_argument_group("output")
    o.add_argument("--slo", default=None, help="goodput SLO, e.g. ttft_ms=200,tpot_ms=50 (also e2el_ms)")
    o.add_argument("--result-json", type=Path, default=None,
                   help="write every request and the summary here; a sweep writes NAME-rateR.json per rate")
    o.add_argument("--plots", type=Path, default=None, help="directory for PNGs (CDFs, throughput, latency vs rate)")
    o.add_argument("--save-generated-texts", action="store_true",
                   help="put every request's text in the JSON (generated_texts)")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return p


def build_items(args: argparse.Namespace, rng: random.Random) -> tuple[list[workloads.WorkItem], list[float] | None]:
    """The work items, and the trace's offsets when one is replayed (else arrivals come from the rate)."""
    tokenizer = None
    if args.tokenizer is not None:
        from conveyor.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    builder = workloads.PromptBuilder(tokenizer, rng)
    if args.trace is not None:
        rows = arrivals.read_length_rows(args.trace, with_time=True)[: args.num_prompts]
        return workloads.items_from_rows(builder, rows, None, rng, sample=False), \
            arrivals.trace_offsets(rows, args.trace_speed)
    if args.workload == "lengths":
        if args.lengths_file is None:
            raise ValueError("--workload lengths needs --lengths-file")
        rows = workloads.load_lengths(args.lengths_file)
        return workloads.items_from_rows(builder, rows, args.num_prompts, rng, sample=True), None
    make = workloads.shared_prefix_items if args.shared_prefix else workloads.random_items
    return make(builder, args.num_prompts, args.input_len, args.output_len, rng), None


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the flags left unset from the preset (or the random workload's defaults)."""
    preset = workloads.PRESETS.get(args.workload)
    args.shared_prefix = bool(preset and preset.shared_prefix)
    args.num_prompts = args.num_prompts or (preset.num_prompts if preset else 1000)
    args.input_len = args.input_len or (preset.input_len if preset else (100, 1024))
    args.output_len = args.output_len or (preset.output_len if preset else (100, 1024))
    args.request_rate = args.request_rate or parse_rates(preset.request_rate if preset else "inf")


def rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


async def amain(argv: Sequence[str] | None = None) -> list[RunResult]:
    args = build_parser().parse_args(argv)
    apply_preset(args)
    slo = parse_slo(args.slo)
    items, trace = build_items(args, random.Random(args.seed))
    rates = [math.inf] if trace is not None else args.request_rate
    results: list[RunResult] = []
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    # limit=0: the concurrency limit is ours (--max-concurrency), not the connection pool's 100
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     headers=headers) as session:
        if args.ready_timeout > 0:
            await wait_ready(session, args.base_url, args.ready_timeout)
        model = args.model or await first_model(session, args.base_url)
        opts = RequestOptions(url=args.base_url.rstrip("/") + args.endpoint, model=model,
                              ignore_eos=args.ignore_eos, temperature=args.temperature, extra_body=args.extra_body)

        async def send(item: workloads.WorkItem, index: int, t0: float) -> RequestRecord:
            return await send_completion(session, opts, item, index, t0)

        for rate in rates:
            for i in range(args.num_warmups):  # JIT, CUDA graphs, prefix cache: not part of the measurement
                warm = await send_completion(session, opts, items[i % len(items)], -1 - i, 0.0)
                if not warm.success:
                    raise ValueError(f"warm-up request failed ({warm.status}): {warm.error[:200]}")
            offsets = trace if trace is not None else arrivals.arrival_offsets(
                len(items), rate, args.burstiness, args.seed)
            records, wall_s = await run_load(items, offsets, send, max_concurrency=args.max_concurrency,
                                             duration_s=args.duration, progress=args.progress)
            res = summarize(
                records, wall_s, slo, date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                base_url=args.base_url, endpoint=args.endpoint, model=model,
                workload="trace" if trace is not None else args.workload, request_rate=rate_label(rate),
                burstiness=args.burstiness, max_concurrency=args.max_concurrency, num_prompts=len(items),
                save_texts=args.save_generated_texts)
            print(format_table(res), flush=True)
            results.append(res)
            if args.result_json is not None:  # now, not after the sweep: a long sweep cut short keeps what ran
                path = args.result_json
                if len(rates) > 1:
                    path = path.with_name(f"{path.stem}-rate{res.request_rate}{path.suffix}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(msgspec.json.format(msgspec.json.encode(res), indent=2))
    if args.plots is not None:
        from conveyor.runtime.tools.loadgen.plots import write_plots  # matplotlib loads only when plots are asked for

        write_plots(results, args.plots)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    try:
        asyncio.run(amain(argv))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, aiohttp.ClientError) as e:  # what the user can fix: say it, no trace
        print(f"conveyor loadgen: error: {e}", file=sys.stderr)
        return 2
    return 0
