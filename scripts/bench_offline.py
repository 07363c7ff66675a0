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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.cli import add_engine_args, engine_config  # noqa: E402


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


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
    add_engine_args(ap)
    ap.set_defaults(max_model_len=2048)
    args = ap.parse_args()

    import torch

    from runtime import LLM, SamplingParams

    config = engine_config(args)
    llm = LLM(**{k: getattr(config, k) for k in config.__struct_fields__})
    core = llm.core
    rng = random.Random(args.workload_seed)
    vocab = core.model_config.vocab_size
    prompts, params = [], []
    for _ in range(args.num_prompts):
        n_in, n_out = rng.randint(*args.input_len), rng.randint(*args.output_len)
        prompts.append([rng.randrange(vocab) for _ in range(n_in)])
        params.append(SamplingParams(temperature=args.temperature, max_tokens=n_out, ignore_eos=True))

    if args.warmup:
        llm.generate([p[:32] for p in prompts[: args.warmup]], SamplingParams(max_tokens=8, ignore_eos=True),
                     use_tqdm=False)
    core.step_records = []
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
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

    def decode_steps(lo: int, hi: int) -> list:
        return [r for r in records if r.num_prefill_tokens == 0 and lo <= r.num_seqs <= hi]

    def mean(values) -> float:
        values = list(values)
        return statistics.fmean(values) if values else float("nan")

    result = {
        "model": core.model_name, "device": str(core.device), "dtype": str(core.dtype).removeprefix("torch."),
        "num_prompts": len(prompts), "input_tokens": n_in, "output_tokens": n_out, "wall_s": wall,
        "output_tok_s": n_out / wall, "total_tok_s": (n_in + n_out) / wall, "steps": len(records),
        "preemptions": core.scheduler.num_preemptions,
        "roofline_s": roofline_s, "roofline_output_tok_s": n_out / roofline_s, "achieved_fraction": roofline_s / wall,
        "bandwidth_tbs": args.bandwidth_tbs,
    }
    for label, (lo, hi) in {"decode_bs_ge_200": (200, 10**9), "decode_bs_8_to_24": (8, 24)}.items():
        steps = decode_steps(lo, hi)
        result[label] = {
            "steps": len(steps),
            "cpu_ms": mean(r.schedule_ms + r.prepare_ms + r.process_ms for r in steps),
            "launch_ms": mean(r.launch_ms for r in steps),
            "wait_ms": mean(r.wait_ms for r in steps),
            "step_ms": mean(r.schedule_ms + r.prepare_ms + r.launch_ms + r.wait_ms + r.process_ms for r in steps),
        }
    print(json.dumps(result, indent=2))
    print(f"\n{core.model_name} on {core.device}: {n_out} output tokens in {wall:.2f} s = "
          f"{n_out / wall:,.0f} output tok/s; roofline {n_out / roofline_s:,.0f} tok/s at "
          f"{args.bandwidth_tbs} TB/s; achieved {roofline_s / wall:.1%}")
    if args.result_json:
        args.result_json.write_text(json.dumps(result, indent=2))
    core.check_integrity()


if __name__ == "__main__":
    main()
