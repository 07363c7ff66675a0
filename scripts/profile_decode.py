#!/usr/bin/env python3
"""Where a steady decode step's device time goes: per-kernel totals from torch.profiler.

    python scripts/profile_decode.py --model qwen3-0.6b --load-format dummy --batch 16 256

For each batch size: fills the engine with that many requests (prompt --prompt-len, outputs long
enough to stay decoding), runs --warmup steps, times --steps steps (ms/step from the engine's
device intervals), then profiles --profile-steps more and prints the top kernels per step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.engine_args import add_engine_args, engine_config  # noqa: E402


def _self_us(event) -> float:
    return event.self_device_time_total if event.device_type.name == "CUDA" else event.self_cpu_time_total


def profile(config, batch: int, args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from conveyor.runtime.build import build_engine, release_device_memory
    from conveyor.scheduler import Request, SamplingParams

    core = build_engine(config)
    rng = random.Random(0)
    vocab = core.model_info.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
        params = SamplingParams(max_tokens=10**6, ignore_eos=True)
        core.add_request(Request(f"r{i}", prompt, params, max_new_tokens=core.max_model_len - args.prompt_len))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in core.scheduler.requests.values()):
        core.step()
    for _ in range(args.warmup):
        core.step()
    core.step_records = []
    for _ in range(args.steps):
        core.step()
    records = [r for r in core.step_records if r.num_prefill_tokens == 0]
    device_ms = statistics.fmean((r.device[1] - r.device[0]) * 1e3 for r in records)
    cpu_ms = statistics.fmean((r.process[1] - r.schedule[0]) * 1e3 for r in records)
    core.step_records = None
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile_steps):
            core.step()
        if core.executor.worker.device.type == "cuda":
            torch.cuda.synchronize()
    lane = "CUDA" if core.executor.worker.device.type == "cuda" else "CPU"
    events = [e for e in prof.key_averages() if e.device_type.name == lane]
    total_us = sum(_self_us(e) for e in events)
    n_kernels = sum(e.count for e in events)
    print(f"\n== batch {batch}, eager={config.enforce_eager}, depth={config.pipeline_depth}: "
          f"device {device_ms:.3f} ms/step, host loop {cpu_ms:.3f} ms/step; profiled "
          f"{total_us / args.profile_steps / 1e3:.3f} ms/step of kernels, {n_kernels / args.profile_steps:.0f} kernels/step")
    events.sort(key=lambda e: _self_us(e), reverse=True)
    for e in events[: args.top]:
        print(f"{_self_us(e) / args.profile_steps:9.1f} us/step {e.count / args.profile_steps:6.1f}x  "
              f"{e.key[:110]}")
    core.close()
    del core
    release_device_memory()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    add_engine_args(ap)
    ap.set_defaults(max_model_len=2048)
    args = ap.parse_args()
    config = engine_config(args)
    for batch in args.batch:
        profile(config, batch, args)


if __name__ == "__main__":
    main()
