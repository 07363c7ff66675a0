#!/usr/bin/env python3
"""Where a steady decode step's device time goes: per-kernel totals from torch.profiler.

    python scripts/profile_decode.py --model qwen3-0.6b --load-format dummy --batch 1 16 64 256

For each batch size and context (--prompt-len): fills the engine with that many requests (outputs
long enough to stay decoding), runs --warmup steps, then times --steps steps: wall ms/step (what
throughput sees: the larger of host and device) and, from the engine's step records, device
ms/step, the bandwidth that implies for the bytes a step must read (weights + KV), host ms/step
(schedule + prepare + launch + process) and the device's idle share. Then it profiles
--profile-steps more and prints the top --top kernels per step (--top 0: no profile).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.engine_args import add_engine_args, engine_config  # noqa: E402


def _self_us(event) -> float:
    return event.self_device_time_total if event.device_type.name == "CUDA" else event.self_cpu_time_total


def profile(config, batch: int, prompt_len: int, args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from conveyor.runtime.build import build_engine
    from conveyor.runtime.engine.step_stats import OverlapSummary, StepRecord
    from conveyor.scheduler import Request, SamplingParams

    core = build_engine(config)
    rng = random.Random(0)
    vocab = core.model_info.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=10**6, ignore_eos=True)
        core.add_request(Request(f"r{i}", prompt, params, max_new_tokens=core.max_model_len - prompt_len))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in core.scheduler.requests.values()):
        core.step()
    for _ in range(args.warmup):
        core.step()
    core.step_records = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    records = [r for r in core.step_records if r.num_prefill_tokens == 0]
    core.step_records = None
    weight_bytes = sum(p.numel() * p.element_size() for p in core.executor.worker.model.parameters())
    kv_token_bytes = core.executor.worker.kv_pool.page_bytes / core.executor.worker.kv_pool.page_size
    device_ms = statistics.fmean(StepRecord.ms(r.device) for r in records)
    read_bytes = weight_bytes + kv_token_bytes * statistics.fmean(r.kv_tokens_read for r in records)
    stages = {name: statistics.fmean(StepRecord.ms(getattr(r, name)) for r in records)
              for name in ("schedule", "prepare", "launch", "process")}
    overlap = OverlapSummary.of(records)
    print(f"\n== batch {batch}, context {prompt_len}, eager={config.enforce_eager}, depth={config.pipeline_depth}: "
          f"step {wall_ms:.3f} ms (wall); device {device_ms:.3f} ms/step ({read_bytes / 1e6:.0f} MB read: {read_bytes / device_ms / 1e6:.0f} GB/s); "
          f"host {sum(stages.values()):.3f} ms/step ({', '.join(f'{k} {v:.3f}' for k, v in stages.items())}); "
          f"device idle {overlap.idle_fraction:.1%}")
    if args.top == 0:
        core.close()
        return
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile_steps):
            core.step()
        if core.executor.worker.device.type == "cuda":
            torch.cuda.synchronize()
    lane = "CUDA" if core.executor.worker.device.type == "cuda" else "CPU"
    events = [e for e in prof.key_averages() if e.device_type.name == lane]
    total_us = sum(_self_us(e) for e in events)
    n_kernels = sum(e.count for e in events)
    print(f"profiled {total_us / args.profile_steps / 1e3:.3f} ms/step of kernels, "
          f"{n_kernels / args.profile_steps:.0f} kernels/step")
    events.sort(key=lambda e: _self_us(e), reverse=True)
    for e in events[: args.top]:
        print(f"{_self_us(e) / args.profile_steps:9.1f} us/step {e.count / args.profile_steps:6.1f}x  "
              f"{e.key[:110]}")
    host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("host ops (self CPU time, profiler overhead included):")
    for e in host[: args.top]:
        print(f"{e.self_cpu_time_total / args.profile_steps:9.1f} us/step {e.count / args.profile_steps:6.1f}x  "
              f"{e.key[:110]}")
    core.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[512], help="contexts to sweep")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    add_engine_args(ap)
    ap.set_defaults(max_model_len=2048)
    args = ap.parse_args()
    config = engine_config(args)
    from conveyor.runtime.build import release_device_memory

    for prompt_len in args.prompt_len:
        for batch in args.batch:
            profile(config, batch, prompt_len, args)
            release_device_memory()  # the engine is unreachable now: its memory goes back to the driver


if __name__ == "__main__":
    main()
