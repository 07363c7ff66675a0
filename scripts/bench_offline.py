#!/usr/bin/env python3
"""Offline throughput: workload W1 (DESIGN.md) or any length mix, with the bandwidth roofline.

W1: 256 requests, prompt and output lengths uniform in [100, 1024], random token ids, ignore EOS,
seed 0, on a preset with dummy weights:

    python scripts/bench_offline.py --model qwen3-0.6b --load-format dummy

The roofline is the time the same schedule needs if every step only moved its bytes (all weights
once, plus the KV it attends over) at --bandwidth-tbs; "achieved" is roofline time / wall time.
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

from runtime.cli import add_engine_args, engine_config  # noqa: E402
from runtime.step_stats import StepRecord  # noqa: E402


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def run_once(config, prompts, params, args) -> dict:
    import torch

    from runtime import LLM, SamplingParams
    from runtime.step_stats import OverlapSummary, write_chrome_trace

    llm = LLM(**{k: getattr(config, k) for k in config.__struct_fields__})
    core = llm.core
    if args.warmup:
        llm.generate([p[:32] for p in prompts[: args.warmup]], SamplingParams(max_tokens=8, ignore_eos=True),
                     use_tqdm=False)
    core.step_records = []
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    wall = time.perf_counter() - start
    records = core.step_records
    core.step_records = None

    mcfg = core.model_config
    elem = torch.empty((), dtype=core.dtype).element_size()
    weight_bytes = sum(p.numel() for p in core.model.parameters()) * elem
    kv_per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * elem
    bw = args.bandwidth_tbs * 1e12
    roofline_s = sum((weight_bytes + r.kv_tokens_read * kv_per_token) / bw for r in records)
    n_out = sum(len(o.token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    overlap = OverlapSummary.of(records)

    def decode_steps(lo: int, hi: int) -> list:
        return [r for r in records if r.num_prefill_tokens == 0 and lo <= r.num_seqs <= hi]

    result = {
        "model": core.model_name, "device": str(core.device), "dtype": str(core.dtype).removeprefix("torch."),
        "pipeline_depth": config.pipeline_depth, "enforce_eager": config.enforce_eager,
        "num_prompts": len(prompts), "input_tokens": n_in, "output_tokens": n_out, "wall_s": round(wall, 3),
        "output_tok_s": round(n_out / wall, 1), "total_tok_s": round((n_in + n_out) / wall, 1),
        "steps": len(records), "preemptions": core.scheduler.num_preemptions,
        "roofline_output_tok_s": round(n_out / roofline_s, 1), "achieved_fraction": round(roofline_s / wall, 4),
        "device_idle_fraction": round(overlap.idle_fraction, 4), "mean_cpu_ms": round(overlap.mean_cpu_ms, 3),
        "mean_device_ms": round(overlap.mean_device_ms, 3),
    }
    for label, (lo, hi) in {"decode_bs_ge_200": (200, 10**9), "decode_bs_8_to_24": (8, 24)}.items():
        steps = decode_steps(lo, hi)
        summary = OverlapSummary.of(steps)
        result[label] = {
            "steps": len(steps), "cpu_ms": round(summary.mean_cpu_ms, 3), "device_ms": round(summary.mean_device_ms, 3),
            "prepare_ms": round(statistics.fmean(StepRecord.ms(r.prepare) for r in steps), 3) if steps else None,
            "launch_ms": round(statistics.fmean(StepRecord.ms(r.launch) for r in steps), 3) if steps else None,
            "device_idle_fraction": round(summary.idle_fraction, 4),
        }
    if args.trace_dir is not None:
        steady = [r for r in records if r.num_prefill_tokens == 0]
        mid = len(steady) // 2
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        write_chrome_trace(steady[mid : mid + args.trace_steps],
                           args.trace_dir / f"trace-depth{config.pipeline_depth}.json", str(core.device))
    core.check_integrity()
    llm.close()
    del llm, core
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=parse_range, default=(100, 1024), help="LO:HI, uniform (or one number)")
    ap.add_argument("--output-len", type=parse_range, default=(100, 1024), help="LO:HI, uniform (or one number)")
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="memory bandwidth for the roofline (H100: 3.35)")
    ap.add_argument("--warmup", type=int, default=4, help="short requests run first, untimed")
    ap.add_argument("--result-json", type=Path, default=None)
    ap.add_argument("--depths", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2],
                    help="pipeline depths to compare on the same workload, e.g. 1,2,3")
    ap.add_argument("--trace-dir", type=Path, default=None, help="write a Chrome/Perfetto trace per depth here")
    ap.add_argument("--trace-steps", type=int, default=20, help="decode steps from mid-run in each trace")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(ap)
    ap.set_defaults(max_model_len=2048)
    args = ap.parse_args()

    from runtime import SamplingParams

    base = engine_config(args)
    rng = random.Random(args.workload_seed)
    from model import resolve_model

    vocab = resolve_model(base.model, base.load_format).config.vocab_size
    prompts, params = [], []
    for _ in range(args.num_prompts):
        n_in, n_out = rng.randint(*args.input_len), rng.randint(*args.output_len)
        prompts.append([rng.randrange(vocab) for _ in range(n_in)])
        params.append(SamplingParams(temperature=args.temperature, max_tokens=n_out, ignore_eos=True))

    results = []
    for depth in args.depths:
        config = msgspec.structs.replace(base, pipeline_depth=depth)
        results.append(run_once(config, prompts, params, args))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'depth':>5} {'out tok/s':>10} {'roofline':>9} {'achieved':>8} {'idle':>6} {'cpu ms':>7} {'dev ms':>7}")
    for r in results:
        print(f"{r['pipeline_depth']:>5} {r['output_tok_s']:>10,.0f} {r['roofline_output_tok_s']:>9,.0f} "
              f"{r['achieved_fraction']:>8.1%} {r['device_idle_fraction']:>6.1%} {r['mean_cpu_ms']:>7.2f} "
              f"{r['mean_device_ms']:>7.2f}")
    if len(results) > 1:
        print(f"\ndepth {results[-1]['pipeline_depth']} vs {results[0]['pipeline_depth']}: "
              f"{results[-1]['output_tok_s'] / results[0]['output_tok_s']:.2f}x output tok/s "
              f"({results[0]['model']} on {results[0]['device']}, same workload, one run)")
    if args.result_json:
        args.result_json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
