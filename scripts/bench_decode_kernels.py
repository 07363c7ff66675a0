#!/usr/bin/env python3
"""Decode-step kernel choices on one GPU, measured side by side (CUDA only).

    python scripts/bench_decode_kernels.py --batch 16 256 --kv-len 560 1000
    python scripts/bench_decode_kernels.py --only gemm --rows 1 16 64 --shapes qwen3-0.6b llama-3.1-8b

Attention: FlashInfer's paged decode on CUDA cores vs tensor cores (fa2 and fa3 kernels), in µs
and in effective KV bandwidth. Q/K norm: a strided 3-D rmsnorm straight on the qkv output vs
copy-then-2-D (what a `.reshape(-1, head_dim)` of a strided view costs). GEMM: each projection of
a decoder layer at a few rows, cuBLAS against model/triton_kernels.py (its own plan and a sweep of
others), timed inside a CUDA graph the way decode steps run, in µs and weight-read TB/s; and the
fused steps (qk norm + RoPE, projection + residual add + norm) against the kernels they replace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the conveyor checkout this script belongs to


def cuda_time_us(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def graph_time_us(fn, reps: int = 20, iters: int = 20) -> float:
    """Per call, ``reps`` calls captured in one CUDA graph: no host launch cost, only the GPU's."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles, loads modules, picks cuBLAS kernels: none of it may happen under capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return cuda_time_us(graph.replay, iters) / reps


# Per layer: (name, N, K) of each projection; the MLP's down projection reads silu(gate) * up.
LAYER_SHAPES = {
    "qwen3-0.6b": [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072),
                   ("lm_head", 151936, 1024)],
    "llama-3.1-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
}


def gemm(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    from conveyor.model import triton_kernels as tk

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'shape':>22} {'rows':>4} {'cuBLAS us':>9} {'TB/s':>5} {'ours us':>8} {'TB/s':>5}  plan; best of sweep")
    for model in args.shapes:
        for name, n, k in LAYER_SHAPES[model]:
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            for m in args.rows:
                split = name in ("o", "down")
                x = torch.randn(m, 2 * k if name == "down" else k, dtype=torch.bfloat16, device="cuda")
                res = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
                nw = torch.ones(n, dtype=torch.bfloat16, device="cuda")
                ref_fn, ours = _gemm_pair(F, tk, name, x, w, res, nw)
                tb = w.numel() * 2 / 1e6
                base = graph_time_us(ref_fn)
                plan = tk.plan_gemm(m, n, k, split, sms)
                if plan is None:
                    print(f"{model + ' ' + name:>22} {m:>4} {base:>9.1f} {tb / base:>5.2f}  not covered")
                    continue
                mine = graph_time_us(lambda: ours(plan))
                line = (f"{model + ' ' + name:>22} {m:>4} {base:>9.1f} {tb / base:>5.2f} {mine:>8.1f} {tb / mine:>5.2f}  "
                        f"{tuple(plan)}")
                if m in args.sweep:
                    best_us, best = min(_sweep(lambda cand: graph_time_us(lambda: ours(cand), iters=5),
                                               plan.block_m, n, k, split))
                    line += f"; {best_us:.1f} us {tb / best_us:.2f} TB/s at {tuple(best)}"
                print(line)


def _sweep(time_plan, block_m: int, n: int, k: int, split: bool):
    from conveyor.model.triton_kernels import GemmPlan

    for bn in (16, 32, 64):
        for splits in ((1, 2, 4, 8) if split else (1,)):
            for bk in (128, 256):
                if n % bn == 0 and k % (splits * bk) == 0:
                    cand = GemmPlan(block_m, bn, bk, splits)
                    yield time_plan(cand), cand


def _gemm_pair(F, tk, name: str, x, w, res, nw):
    """(the unfused step as the engine runs it without Triton, ours under a given plan)."""
    import flashinfer

    if name == "down":
        def ref():
            h = F.linear(flashinfer.silu_and_mul(x), w)
            flashinfer.fused_add_rmsnorm(h, res, nw, 1e-6)
        return ref, lambda plan: tk.linear_add_rms_norm(x, w, res, nw, 1e-6, silu_mul=True, plan=plan)
    if name == "o":
        def ref():
            flashinfer.fused_add_rmsnorm(F.linear(x, w), res, nw, 1e-6)
        return ref, lambda plan: tk.linear_add_rms_norm(x, w, res, nw, 1e-6, plan=plan)
    return lambda: F.linear(x, w), lambda plan: tk.skinny_linear(x, w, plan=plan)


def fused_norm_rope(args: argparse.Namespace) -> None:
    import flashinfer

    from conveyor.model import triton_kernels as tk

    hq, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    cos_sin = torch.randn(4096, d, dtype=torch.float32, device="cuda")
    wq = torch.rand(d, dtype=torch.bfloat16, device="cuda") + 0.5
    wk = torch.rand(d, dtype=torch.bfloat16, device="cuda") + 0.5
    for m in args.rows:
        qkv = torch.randn(m, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")
        pos = torch.randint(0, 4096, (m,), dtype=torch.int32, device="cuda")

        def ref():
            q = flashinfer.rmsnorm(qkv[:, : hq * d].view(m, hq, d), wq, 1e-6)
            k = flashinfer.rmsnorm(qkv[:, hq * d: (hq + hkv) * d].view(m, hkv, d), wk, 1e-6)
            flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, q.view(m, -1), k.view(m, -1), d, cos_sin, is_neox=True)

        base = graph_time_us(ref)
        mine = graph_time_us(lambda: tk.qk_norm_rope(qkv, pos, wq, wk, 1e-6, cos_sin, hq, hkv, d))
        print(f"qk norm + rope, {m} rows: FlashInfer (3 kernels) {base:.1f} us, fused {mine:.1f} us")


def attention(args: argparse.Namespace) -> None:
    import flashinfer

    hq, hkv, d, page = args.num_heads, args.num_kv_heads, args.head_dim, 16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{'batch':>5} {'kv_len':>6} {'kernel':>14} {'us':>8} {'TB/s':>6}")
    for bs in args.batch:
        for kv_len in args.kv_len:
            pages_per = -(-kv_len // page)
            kv = torch.randn(bs * pages_per + 1, 2, page, hkv, d, dtype=torch.bfloat16, device="cuda")
            indptr = torch.arange(bs + 1, dtype=torch.int32) * pages_per
            indices = torch.arange(1, bs * pages_per + 1, dtype=torch.int32, device="cuda")
            last = torch.full((bs,), kv_len - (pages_per - 1) * page, dtype=torch.int32)
            q = torch.randn(bs, hq, d, dtype=torch.bfloat16, device="cuda")
            out = torch.empty_like(q)
            kv_bytes = bs * kv_len * 2 * hkv * d * 2
            ref = None
            for name, tc, backend in (("cuda-cores", False, "fa2"), ("tc-fa2", True, "fa2"), ("tc-fa3", True, "fa3")):
                try:
                    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc, backend=backend)
                    w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type=torch.bfloat16,
                           kv_data_type=torch.bfloat16)
                    us = cuda_time_us(lambda: w.run(q, kv, out=out))
                except Exception as e:  # a kernel the kit lacks: say so and go on
                    print(f"{bs:>5} {kv_len:>6} {name:>14} unavailable: {type(e).__name__}: {str(e)[:80]}")
                    continue
                ref = out.clone() if ref is None else ref
                err = (out.float() - ref.float()).abs().max().item()
                print(f"{bs:>5} {kv_len:>6} {name:>14} {us:>8.1f} {kv_bytes / us / 1e6:>6.2f}  max|diff| {err:.3g}")


def qk_norm(args: argparse.Namespace) -> None:
    import flashinfer

    hq, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    for bs in args.batch:
        qkv = torch.randn(bs, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")
        w = torch.rand(d, dtype=torch.bfloat16, device="cuda") + 0.5
        q = qkv[:, : hq * d].view(bs, hq, d)
        ref = flashinfer.rmsnorm(q.reshape(-1, d), w, 1e-6).view(bs, hq, d)
        copy_us = cuda_time_us(lambda: flashinfer.rmsnorm(q.reshape(-1, d), w, 1e-6))
        try:
            out = torch.empty(bs, hq, d, dtype=torch.bfloat16, device="cuda")
            flashinfer.rmsnorm(q, w, 1e-6, out=out)
            err = (out.float() - ref.float()).abs().max().item()
            strided_us = cuda_time_us(lambda: flashinfer.rmsnorm(q, w, 1e-6, out=out))
            print(f"qk-norm batch {bs}: copy+2-D {copy_us:.1f} us, strided 3-D {strided_us:.1f} us, max|diff| {err:.3g}")
        except Exception as e:
            print(f"qk-norm batch {bs}: copy+2-D {copy_us:.1f} us, strided 3-D unavailable: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--kv-len", type=int, nargs="+", default=[560, 1000])
    ap.add_argument("--num-heads", type=int, default=16)  # qwen3-0.6b
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="gemm: rows per step")
    ap.add_argument("--sweep", type=int, nargs="*", default=[], help="gemm: rows at which to also sweep tile plans")
    ap.add_argument("--shapes", nargs="+", default=["qwen3-0.6b"], choices=sorted(LAYER_SHAPES))
    ap.add_argument("--only", nargs="+", choices=["attention", "qk-norm", "gemm", "fused"],
                    default=["attention", "qk-norm", "gemm", "fused"])
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    sections = {"attention": attention, "qk-norm": qk_norm, "gemm": gemm, "fused": fused_norm_rope}
    for name in args.only:
        sections[name](args)


if __name__ == "__main__":
    main()
