#!/usr/bin/env python3
"""Piecewise CUDA graphs on vs off, one run each on the same online workload, and their ratios.

A busy chat server's steps mostly decode, and every arrival adds a short prefill to one of them.
Without piecewise graphs such a mixed step launches the whole forward eagerly from Python; with
them it replays one graph per layer around the attention calls. The workload: Poisson arrivals
(``--rate``), prompts and outputs uniform in ``--input-len`` / ``--output-len``, at most
``--max-num-seqs`` running. Printed per mode: host launch and device time of the steps that
prefill and of those that only decode, TTFT and TPOT, output tok/s; then eager / piecewise.

    python scripts/bench_piecewise.py --model qwen3-0.6b --load-format dummy
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.engine.config import EngineConfig  # noqa: E402
from conveyor.runtime.engine_args import (  # noqa: E402
    add_engine_args,
    engine_config,
    parse_range,  # noqa: E402
)
from conveyor.runtime.tools.compare import WorkItem, warm_up  # noqa: E402
from conveyor.runtime.tools.driver import replay  # noqa: E402


def workload(args: argparse.Namespace, vocab: int) -> list[WorkItem]:
    rng = random.Random(args.seed)  # the engine's --seed
    t, items = 0.0, []
    for i in range(args.num_requests):
        t += rng.expovariate(args.rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*args.input_len))]
        items.append(WorkItem(i, prompt, rng.randint(*args.output_len), t))
    return items


def run(config: EngineConfig, args: argparse.Namespace) -> dict[str, float]:
    from conveyor.runtime.build import build_engine
    from conveyor.scheduler import SamplingParams

    core = build_engine(config)
    try:
        items = workload(args, core.model_info.vocab_size)
        warm_up(core, items, 4, 0.0)
        core.step_records = []

        def make_request(item: WorkItem, t0: float):
            params = SamplingParams(temperature=0.0, max_tokens=item.output_len, ignore_eos=True)
            req = core.inputs.make_request(item.prompt_ids, params, request_id=str(item.index))
            req.arrival_time = t0 + item.arrival_s
            return req

        reqs, t0 = replay(core, items, lambda it: it.arrival_s, make_request)
        records = core.step_records
    finally:
        core.close()

    def span(rs, field: str) -> float:
        return 1000 * statistics.fmean(getattr(r, field)[1] - getattr(r, field)[0] for r in rs) if rs else float("nan")

    mixed = [r for r in records if r.num_prefill_tokens > 0]
    decode = [r for r in records if r.num_prefill_tokens == 0]
    ttft = sorted(r.first_token_time - r.arrival_time for r in reqs)
    tpot = [(r.finish_time - r.first_token_time) / (len(r.output_token_ids) - 1) for r in reqs
            if len(r.output_token_ids) > 1]
    wall = max(r.finish_time for r in reqs) - t0
    return {
        "prefill_steps": len(mixed), "prefill_step_tokens": statistics.fmean(r.num_tokens for r in mixed),
        "prefill_launch_ms": span(mixed, "launch"), "prefill_device_ms": span(mixed, "device"),
        "decode_steps": len(decode), "decode_device_ms": span(decode, "device"),
        "ttft_mean_ms": 1000 * statistics.fmean(ttft), "ttft_p95_ms": 1000 * ttft[int(0.95 * (len(ttft) - 1))],
        "tpot_mean_ms": 1000 * statistics.fmean(tpot),
        "output_tok_per_s": sum(len(r.output_token_ids) for r in reqs) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.set_defaults(max_num_seqs=16)
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=400)
    w.add_argument("--rate", type=float, default=20.0, help="Poisson arrivals per second")
    w.add_argument("--input-len", type=parse_range, default=(16, 256), help="uniform LO:HI prompt tokens")
    w.add_argument("--output-len", type=parse_range, default=(16, 128), help="uniform LO:HI output tokens")
    args = p.parse_args(argv)
    base = engine_config(args)
    if base.max_piecewise_tokens == 0 or base.enforce_eager:
        p.error("piecewise graphs are what this compares: leave --max-piecewise-tokens above 0 and graphs on")
    from conveyor.runtime.build import release_device_memory

    rows = {}
    for name, n in (("eager", 0), ("piecewise", base.max_piecewise_tokens)):
        rows[name] = run(msgspec.structs.replace(base, max_piecewise_tokens=n), args)
        release_device_memory()  # the engine is gone: its model and KV pool must be before the next one's
    print(f"{'metric':24}{'eager':>12}{'piecewise':>12}{'eager/pw':>10}")
    for key in rows["eager"]:
        e, pw = rows["eager"][key], rows["piecewise"][key]
        print(f"{key:24}{e:12.4g}{pw:12.4g}{e / pw if pw else float('nan'):10.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
