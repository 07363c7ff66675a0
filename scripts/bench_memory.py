#!/usr/bin/env python3
"""KV memory policies, each pair on one workload in one process, with the ratio printed.

    python scripts/bench_memory.py --model qwen3-0.6b --load-format dummy --scenario reservation rag swap

reservation  chat-like: max_tokens 2048 but outputs of ~500 (uniform 250-750); conservative vs
             dynamic reservation on a KV pool sized so that memory, not --max-num-seqs, binds.
             Reports peak/mean running requests, output tok/s, retractions per request.
rag          long prompts (a shared document of 1.5k-3.5k tokens + a short question), short
             answers, Poisson arrivals: prefix caching off vs on. Prefill tokens computed,
             mean/p50 TTFT, cache hit rate.
swap         long prompts under forced memory pressure (dynamic, beta fixed at 0.05): recompute vs
             swap preemption. Output tok/s, tokens computed twice, swaps.

Requests "end" at their drawn output length the way EOS ends them: the engine does not know the
length in advance, and the finish is found when that step's outputs are processed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.engine_args import add_engine_args, engine_config, parse_bytes  # noqa: E402


class Job(msgspec.Struct, frozen=True):
    arrival: float  # seconds after start
    prompt: list[int]
    max_tokens: int
    stop_after: int  # the output length at which it "hits EOS"


def drive(config, jobs: list[Job]) -> dict:
    """Replay ``jobs`` against one engine; requests finish (as STOP) at their drawn length."""
    import torch

    from conveyor.runtime.build import build_engine, release_device_memory
    from conveyor.scheduler import FinishReason, Request, SamplingParams

    core = build_engine(config)
    # Warm up (graphs, allocator) outside the measurement; aborted, so beta learns nothing from them.
    for i in range(4):
        core.add_request(Request(f"warm{i}", jobs[i].prompt[:32], SamplingParams(max_tokens=8, ignore_eos=True), 8))
    for _ in range(4):
        core.step()
    for i in range(4):
        core.abort_request(f"warm{i}")
    while core.has_work():
        core.step()
    base = core.stats()
    pending = sorted(jobs, key=lambda j: j.arrival)
    by_id = {f"r{i}": j for i, j in enumerate(pending)}
    ttft, running, n_out = [], [], 0
    start = time.perf_counter()
    nxt = 0
    while nxt < len(pending) or core.has_work():
        now = time.perf_counter() - start
        while nxt < len(pending) and pending[nxt].arrival <= now:
            j = pending[nxt]
            core.add_request(core.inputs.make_request(j.prompt, SamplingParams(max_tokens=j.max_tokens,
                                                                                ignore_eos=True), request_id=f"r{nxt}"))
            nxt += 1
        if not core.has_work():
            time.sleep(max(0.0, min(0.01, pending[nxt].arrival - now)))
            continue
        running.append(len(core.scheduler.running))
        for out in core.step():
            if out.first_token_time is not None and out.num_output_tokens == len(out.token_ids) and out.token_ids:
                ttft.append(out.first_token_time - out.arrival_time)
            if out.finished:
                n_out += out.num_output_tokens
            elif out.num_output_tokens >= by_id[out.request_id].stop_after:
                end = core.abort_request(out.request_id, FinishReason.STOP)
                if end is not None:
                    n_out += end.num_output_tokens
    wall = time.perf_counter() - start
    if core.executor.worker.device.type == "cuda":
        torch.cuda.synchronize()
    stats = core.stats()
    core.check_integrity()
    result = {
        "device": torch.cuda.get_device_name() if core.executor.worker.device.type == "cuda" else "cpu",
        "wall_s": round(wall, 2), "requests": len(jobs), "output_tokens": n_out,
        "output_tok_s": round(n_out / wall, 1),
        "running_peak": max(running), "running_mean": round(statistics.fmean(running), 1),
        "retractions": stats.num_retractions - base.num_retractions,
        "retractions_per_request": round((stats.num_retractions - base.num_retractions) / len(jobs), 4),
        "final_beta": round(stats.reservation_beta, 3),
        "prefill_tokens": stats.prefill_tokens - base.prefill_tokens,
        "prefix_hit_tokens": stats.prefix_hit_tokens - base.prefix_hit_tokens,
        "swapped_out": stats.num_swapped_out, "kv_pages": stats.kv_pages_total,
        "ttft_mean_ms": round(statistics.fmean(ttft) * 1e3, 1) if ttft else None,
        "ttft_p50_ms": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
    }
    hits, computed = result["prefix_hit_tokens"], result["prefill_tokens"]
    result["cache_hit_rate"] = round(hits / (hits + computed), 4) if hits + computed else 0.0
    core.close()
    del core
    release_device_memory()
    return result


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def reservation_jobs(args, vocab: int) -> list[Job]:
    rng = random.Random(args.workload_seed)
    return [Job(0.0, random_tokens(rng, rng.randint(scaled(args, 100), scaled(args, 400)), vocab), scaled(args, 2048),
                rng.randint(scaled(args, 250), scaled(args, 750)))
            for _ in range(args.num_requests)]


def scaled(args, n: int) -> int:
    """Lengths are written for a 4096-token context; smaller models (CPU smoke runs) scale them down."""
    return max(1, n * min(args.max_model_len, 4096) // 4096)


def rag_jobs(args, vocab: int) -> list[Job]:
    rng = random.Random(args.workload_seed)
    docs = [random_tokens(rng, rng.randint(scaled(args, 1500), scaled(args, 3500)), vocab) for _ in range(args.num_docs)]
    t, jobs = 0.0, []
    for _ in range(args.num_requests):
        t += rng.expovariate(args.rate)
        out = rng.randint(32, 128)
        jobs.append(Job(t, rng.choice(docs) + random_tokens(rng, rng.randint(20, 100), vocab), out, out))
    return jobs


def swap_jobs(args, vocab: int) -> list[Job]:
    rng = random.Random(args.workload_seed)
    return [Job(0.0, random_tokens(rng, rng.randint(scaled(args, 1000), scaled(args, 3000)), vocab), scaled(args, 1024),
                rng.randint(scaled(args, 256), scaled(args, 1024))) for _ in range(args.num_requests)]


SCENARIOS = {
    # name: (jobs, (label, config overrides) x 2, the numbers to put side by side)
    "reservation": (reservation_jobs, [("conservative", {"reservation": "conservative"}),
                                       ("dynamic", {"reservation": "dynamic"})],
                    ["running_peak", "running_mean", "output_tok_s", "retractions_per_request", "final_beta"]),
    "rag": (rag_jobs, [("no-cache", {"enable_prefix_caching": False}), ("prefix-cache", {"enable_prefix_caching": True})],
            ["prefill_tokens", "ttft_mean_ms", "ttft_p50_ms", "cache_hit_rate", "output_tok_s"]),
    "swap": (swap_jobs, [("recompute", {"preemption_mode": "recompute"}), ("swap", {"preemption_mode": "swap"})],
             ["output_tok_s", "prefill_tokens", "retractions", "swapped_out", "running_mean"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    ap.add_argument("--num-requests", type=int, default=400)
    ap.add_argument("--num-docs", type=int, default=8, help="rag: distinct documents")
    ap.add_argument("--rate", type=float, default=8.0, help="rag: Poisson arrivals per second")
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--scenario-kv-memory", type=parse_bytes, default=None,
                    help="KV pool for the reservation and swap scenarios, e.g. 6GiB (default: --kv-cache-memory)")
    ap.add_argument("--result-json", type=Path, default=None)
    add_engine_args(ap)
    ap.set_defaults(max_model_len=4096)
    args = ap.parse_args()
    base = engine_config(args)
    from conveyor.model import resolve_model

    vocab = resolve_model(base.model, base.load_format).config.vocab_size
    report = {}
    for name in args.scenario:
        make_jobs, variants, keys = SCENARIOS[name]
        jobs = make_jobs(args, vocab)
        results = {}
        for label, overrides in variants:
            if name == "swap":
                overrides = {"reservation": "dynamic", "reservation_beta": 0.05, "reservation_adapt": False,
                             "enable_prefix_caching": False, **overrides}
            if name != "rag" and args.scenario_kv_memory is not None:
                overrides = {"kv_cache_memory": args.scenario_kv_memory, **overrides}
            config = msgspec.structs.replace(base, **overrides)
            results[label] = drive(config, jobs)
            print(json.dumps({"scenario": name, "variant": label, **results[label]}), flush=True)
        (a, ra), (b, rb) = results.items()
        print(f"\n== {name}: {len(jobs)} requests, {base.model} on {ra['device']} ==")
        print(f"{'':>26} {a:>14} {b:>14} {b + '/' + a:>12}")
        for key in keys:
            x, y = ra[key], rb[key]
            ratio = f"{y / x:.2f}x" if isinstance(x, (int, float)) and x else "-"
            print(f"{key:>26} {x!s:>14} {y!s:>14} {ratio:>12}")
        report[name] = results
    if args.result_json:
        args.result_json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
