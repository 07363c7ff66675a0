#!/usr/bin/env python3
"""Offline throughput: workload W1 (DESIGN.md) or any length mix, with the bandwidth roofline.

W1: 256 requests, prompt and output lengths uniform in [100, 1024], random token ids, ignore EOS,
seed 0, on a preset with dummy weights:

    python scripts/bench_offline.py --model qwen3-0.6b --load-format dummy

The roofline is the time the same schedule needs if every step only moved its bytes (all weights
once, plus the KV it attends over) at --bandwidth-tbs; "achieved" is roofline time / wall time.

--compare-hf then runs Hugging Face transformers on the same requests in this process (its
continuous batching when the installed version has it, else padded static batches of
--hf-batch-size) and prints our output tok/s over its. --step-records PATH writes the last
depth's StepRecords as JSON objects (field names as keys, (start, end) spans as 2-element
arrays), the input for fitting a step-time cost model (scripts/simulate.py).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.engine.config import EngineConfig  # noqa: E402
from conveyor.runtime.engine.step_stats import StepRecord  # noqa: E402
from conveyor.runtime.engine_args import (  # noqa: E402
    add_engine_args,
    engine_config,
    parse_range,  # noqa: E402
)
from conveyor.runtime.tools.simulator.cost_model import save_step_records  # noqa: E402
from conveyor.scheduler import SamplingParams  # noqa: E402


def run_once(config, prompts, params, args) -> tuple[dict, list[StepRecord]]:
    import torch

    from conveyor.runtime import LLM, SamplingParams
    from conveyor.runtime.build import release_device_memory
    from conveyor.runtime.engine.step_stats import OverlapSummary, write_chrome_trace

    llm = LLM(**{k: getattr(config, k) for k in config.__struct_fields__})
    core = llm.core
    if args.warmup:
        # Every id shifted by one, so the prefix cache has nothing from the warm-up to serve the run.
        vocab = core.model_info.vocab_size
        llm.generate([[(t + 1) % vocab for t in p[:32]] for p in prompts[: args.warmup]],
                     SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    core.step_records = []
    if core.executor.worker.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    wall = time.perf_counter() - start
    records = core.step_records
    core.step_records = None

    mcfg = core.executor.worker.model_config
    elem = torch.empty((), dtype=core.executor.worker.dtype).element_size()
    weight_bytes = sum(p.numel() for p in core.executor.worker.model.parameters()) * elem
    kv_per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * elem
    bw = args.bandwidth_tbs * 1e12
    roofline_s = sum((weight_bytes + r.kv_tokens_read * kv_per_token) / bw for r in records)
    n_out = sum(len(o.token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    overlap = OverlapSummary.of(records)

    def decode_steps(lo: int, hi: int) -> list:
        return [r for r in records if r.num_prefill_tokens == 0 and lo <= r.num_seqs <= hi]

    result = {
        "model": core.model_name, "device": str(core.executor.worker.device), "dtype": str(core.executor.worker.dtype).removeprefix("torch."),
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
                           args.trace_dir / f"trace-depth{config.pipeline_depth}.json", str(core.executor.worker.device))
    core.check_integrity()
    llm.close()
    del llm, core
    release_device_memory()
    return result, records


# -- Hugging Face transformers on the same workload -------------------------------------------
def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs ``fn`` takes: transformers' continuous-batching API grew arguments release by release."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _hf_continuous(model: Any, prompts: list[list[int]], out_lens: list[int], gen_config: Any, config: EngineConfig,
                   warmup: int, quiet: bool, attn_implementation: str | None) -> tuple[float, list[int], str]:
    """transformers' continuous batching (the manager generate_batch drives), one request per prompt.

    generate_batch takes one max_new_tokens for all; the manager takes one per request, which W1's
    mixed output lengths need. EOS id -1 never matches, so every request runs its full length.
    """
    from tqdm import tqdm

    cb_kwargs: dict[str, Any] = {}
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older releases size the cache themselves
        ContinuousBatchingConfig = None
    if ContinuousBatchingConfig is not None:
        sizes: dict[str, Any] = {"max_batch_tokens": config.max_num_batched_tokens,
                                 "max_requests_per_batch": config.max_num_seqs}
        if attn_implementation is not None:  # asked for: keep it, no switch to flash attention
            sizes["auto_switch_to_flash"] = False
        if model.device.type == "cpu":
            # On the CPU transformers sizes its KV cache from host memory, which takes seconds to
            # allocate: give it the pages this workload can use at most.
            sizes["page_size"] = config.block_size
            sizes["num_blocks"] = sum(-(-(len(p) + n) // config.block_size) for p, n in zip(prompts, out_lens)) + 8
        cb_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**_accepted(ContinuousBatchingConfig, sizes))
    manager_cm = model.continuous_batching_context_manager
    with manager_cm(generation_config=gen_config, **_accepted(manager_cm, {**cb_kwargs, "warmup": True})) as manager:

        def run(batch: list[list[int]], lens: list[int], prefix: str, desc: str | None) -> dict[str, list[int]]:
            for i, (p, n) in enumerate(zip(batch, lens)):
                manager.add_request(p, **_accepted(manager.add_request, {
                    "request_id": f"{prefix}{i}", "max_new_tokens": n, "eos_token_id": -1}))
            done: dict[str, list[int]] = {}
            with tqdm(total=len(batch), desc=desc, unit="req", disable=desc is None) as bar:
                while len(done) < len(batch):
                    out = manager.get_result(timeout=1)
                    if out is not None and out.is_finished():
                        if out.error is not None:
                            raise RuntimeError(f"transformers failed request {out.request_id}: {out.error}")
                        done[out.request_id] = list(out.generated_tokens)
                        bar.update(1)
                    elif out is None and not manager.is_running():
                        raise RuntimeError("transformers' continuous batching loop died")
            return done

        if warmup:
            run([p[:32] for p in prompts[:warmup]], [8] * min(warmup, len(prompts)), "warmup-", None)
        start = time.perf_counter()
        done = run(prompts, out_lens, "", None if quiet else "transformers")
        wall = time.perf_counter() - start
        used_attn = model.config._attn_implementation  # what the manager switched to; restored on exit
    return wall, [len(done[str(i)]) for i in range(len(prompts))], used_attn


def _hf_static(model: Any, prompts: list[list[int]], out_lens: list[int], gen_config: Any, batch_size: int,
               warmup: int, quiet: bool) -> tuple[float, list[int]]:
    """Padded static batches: left-padded prompts, every row runs to the batch's longest output."""
    import torch
    from tqdm import tqdm

    def generate(batch: list[list[int]], n: int) -> None:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        # min_new_tokens = max_new_tokens: EOS cannot end a row early, like ignore_eos.
        model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config, max_new_tokens=n,
                       min_new_tokens=n)

    if warmup:
        generate([p[:32] for p in prompts[:warmup]], 8)
    counted: list[int] = []
    start = time.perf_counter()
    for lo in tqdm(range(0, len(prompts), batch_size), desc="transformers (static)", disable=quiet):
        lens = out_lens[lo : lo + batch_size]
        generate(prompts[lo : lo + batch_size], max(lens))
        counted += lens  # the rows past their own length are padding work, not output
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, counted


def run_hf(config: EngineConfig, prompts: list[list[int]], params: list[SamplingParams],
           args: argparse.Namespace) -> dict[str, Any]:
    """transformers on the same prompts and output lengths, same dtype and device; dummy weights stay random."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from conveyor.model import resolve_model
    from conveyor.runtime.worker.worker import resolve_device, resolve_dtype

    source = resolve_model(config.model, config.load_format)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    attn = {"attn_implementation": args.hf_attn_implementation} if args.hf_attn_implementation else {}
    if source.weights_dir is None:
        # Random weights: only the shapes matter, as EOS is ignored and lengths are fixed.
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**source.hf_config), **attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.weights_dir, **attn)
    model = model.to(device=device, dtype=dtype).eval()
    temperature = params[0].temperature
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    gen_config = GenerationConfig(**sampling, eos_token_id=-1, pad_token_id=0)
    out_lens = [p.max_tokens for p in params]
    continuous = hasattr(model, "continuous_batching_context_manager") and not args.hf_static
    # no_grad, not inference_mode: transformers' batching thread updates its cache in place outside
    # inference mode, which tensors created under it forbid.
    with torch.no_grad():
        if continuous:
            wall, got, used_attn = _hf_continuous(model, prompts, out_lens, gen_config, config, args.warmup,
                                                  args.quiet, args.hf_attn_implementation)
        else:
            wall, got = _hf_static(model, prompts, out_lens, gen_config, args.hf_batch_size, args.warmup, args.quiet)
            used_attn = model.config._attn_implementation
    if got != out_lens:  # throughput counts what it generated; say that it differs from what was asked
        off = sum(g != n for g, n in zip(got, out_lens))
        print(f"warning: transformers generated other lengths than asked for {off} of {len(out_lens)} requests "
              f"({sum(got)} tokens instead of {sum(out_lens)})", file=sys.stderr)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    n_out = sum(got)
    return {
        "engine": f"transformers {transformers.__version__}",
        "mode": "continuous batching" if continuous else f"padded static batches of {args.hf_batch_size}",
        "attn_implementation": used_attn,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "num_prompts": len(prompts),
        "output_tokens": n_out, "wall_s": round(wall, 3), "output_tok_s": round(n_out / wall, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
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
    ap.add_argument("--step-records", type=Path, default=None,
                    help="write the last depth's StepRecords here as a JSON array of objects")
    hf = ap.add_argument_group("transformers baseline")
    hf.add_argument("--compare-hf", action="store_true",
                    help="afterwards, run transformers on the same workload in this process and print the ratio")
    hf.add_argument("--hf-static", action="store_true",
                    help="use padded static generate() even when transformers has continuous batching")
    hf.add_argument("--hf-batch-size", type=int, default=64, help="static batches' size (default: 64)")
    hf.add_argument("--hf-attn-implementation", default=None,
                    help="e.g. sdpa or flash_attention_2 (default: transformers' choice; its continuous batching "
                    "switches to flash attention when it finds it)")
    add_engine_args(ap)
    ap.set_defaults(max_model_len=2048)
    args = ap.parse_args(argv)

    from conveyor.runtime import SamplingParams

    base = engine_config(args)
    rng = random.Random(args.workload_seed)
    from conveyor.model import resolve_model

    vocab = resolve_model(base.model, base.load_format).config.vocab_size
    prompts, params = [], []
    for _ in range(args.num_prompts):
        n_in, n_out = rng.randint(*args.input_len), rng.randint(*args.output_len)
        prompts.append([rng.randrange(vocab) for _ in range(n_in)])
        params.append(SamplingParams(temperature=args.temperature, max_tokens=n_out, ignore_eos=True))

    results, records = [], []
    for depth in args.depths:
        config = msgspec.structs.replace(base, pipeline_depth=depth)
        result, records = run_once(config, prompts, params, args)
        results.append(result)
        print(json.dumps(results[-1]), flush=True)
    if args.step_records is not None:
        save_step_records(records, args.step_records)
    print(f"\n{'depth':>5} {'out tok/s':>10} {'roofline':>9} {'achieved':>8} {'idle':>6} {'cpu ms':>7} {'dev ms':>7}")
    for r in results:
        print(f"{r['pipeline_depth']:>5} {r['output_tok_s']:>10,.0f} {r['roofline_output_tok_s']:>9,.0f} "
              f"{r['achieved_fraction']:>8.1%} {r['device_idle_fraction']:>6.1%} {r['mean_cpu_ms']:>7.2f} "
              f"{r['mean_device_ms']:>7.2f}")
    if len(results) > 1:
        print(f"\ndepth {results[-1]['pipeline_depth']} vs {results[0]['pipeline_depth']}: "
              f"{results[-1]['output_tok_s'] / results[0]['output_tok_s']:.2f}x output tok/s "
              f"({results[0]['model']} on {results[0]['device']}, same workload, one run)")
    if args.compare_hf:
        if args.result_json:  # ours are kept even if transformers fails
            args.result_json.write_text(json.dumps(results, indent=2))
        hf_result = run_hf(base, prompts, params, args)
        print(json.dumps(hf_result), flush=True)
        print(f"\n{hf_result['engine']} ({hf_result['mode']}): {hf_result['output_tok_s']:,.0f} output tok/s")
        for r in results:
            r["vs_hf"] = round(r["output_tok_s"] / hf_result["output_tok_s"], 3)
            print(f"depth {r['pipeline_depth']} / transformers: {r['vs_hf']:.2f}x output tok/s "
                  "(same workload, same process)")
        results.append(hf_result)
    if args.result_json:
        args.result_json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
