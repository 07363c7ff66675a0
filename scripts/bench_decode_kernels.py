#!/usr/bin/env python3
"""Decode-step kernel choices on one GPU, measured side by side (CUDA only).

    python scripts/bench_decode_kernels.py --batch 16 256 --kv-len 560 1000

Attention: FlashInfer's paged decode on CUDA cores vs tensor cores (fa2 and fa3 kernels), in µs
and in effective KV bandwidth. Q/K norm: a strided 3-D rmsnorm straight on the qkv output vs
copy-then-2-D (what a `.reshape(-1, head_dim)` of a strided view costs).
"""

from __future__ import annotations

import argparse

import torch


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
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    attention(args)
    qk_norm(args)


if __name__ == "__main__":
    main()
