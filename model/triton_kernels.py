"""Triton kernels for small-batch decode on CUDA: skinny GEMMs and the fusions around them.

At a few rows per step every projection is a weight read that cuBLAS's tiles for small M leave
far from the memory bandwidth, and between the GEMMs the step is a chain of microsecond kernels.
These kernels read each weight once with about a CTA per SM, and fold the small steps into their
neighbours:

- ``skinny_linear``: ``x @ w.T (+ b)`` for M <= ``MAX_ROWS``, optionally ``silu(gate) * up`` applied
  to x as it is loaded (the MLP's activation folded into the down projection);
- ``linear_add_rms_norm``: a split-K projection whose partial sums are reduced by the kernel that
  adds the residual and applies the next RMSNorm (no separate split-K reduction pass);
- ``qk_norm_rope``: Qwen3's per-head q/k RMSNorm and neox RoPE in one pass over the qkv output.

Each matches ``model.ops`` (the torch reference, the CPU path) to bf16 rounding; tests/test_gpu.py
checks them against it. Shapes a kernel does not cover return None and the caller falls back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Measured on the H200 (scripts/bench_decode_kernels.py --only gemm): at 64 rows cuBLAS is faster on
# three of the four projections; up to 16 every row shares one 16-row MMA tile.
MAX_ROWS = 16


class GemmPlan(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    splits: int  # K is cut into this many slices, each summed by its own CTA
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _first_dividing(total: int, options: tuple[int, ...]) -> int | None:  # options in order of preference
    return next((o for o in options if total % o == 0), None)


@functools.cache
def plan_gemm(m: int, n: int, k: int, split: bool, sm_count: int) -> GemmPlan | None:
    """The widest column blocks that still give about one CTA per SM (half an SM's worth at least
    without ``split``; with it, K is cut into slices until the CTAs cover the SMs). The rule fits
    the sweep of scripts/bench_decode_kernels.py on the H200: fewer, fatter CTAs beat many thin
    ones, and 128-wide K steps beat 256. None: a shape we do not cover."""
    if m > MAX_ROWS or n % 16 or k % 32:
        return None
    block_m = max(16, triton.next_power_of_2(m))
    if not split:
        block_n = next((b for b in (64, 32) if n % b == 0 and n // b >= sm_count // 2), 16)
        block_k = _first_dividing(k, (128, 256, 64, 32))
        return GemmPlan(block_m, block_n, block_k, 1) if block_k else None
    block_n = next(b for b in (64, 32, 16) if n % b == 0)
    splits = 1  # a power of two (the reduction loads them as one block), at most 8
    while (n // block_n) * splits < sm_count * 9 // 10 and splits < 8 and k % (2 * splits * 32) == 0:
        splits *= 2
    block_k = _first_dividing(k // splits, (128, 256, 64, 32))
    return GemmPlan(block_m, block_n, block_k, splits) if block_k else None


# The row count is not specialised on: a step with a new count (an eager call outside the graphs)
# must not stop to compile a variant.
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, stride_xm, stride_wn, stride_om, stride_os, up_offset,
                 K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k0 = pid_s * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k = k0 + kk
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k + rk)[None, :]
        if SILU_MUL:  # x is [M, 2K]: gate then up; the product is rounded as silu_and_mul stores it
            gate = tl.load(x_ptrs, mask=rows, other=0.0).to(tl.float32)
            up = tl.load(x_ptrs + up_offset, mask=rows, other=0.0).to(tl.float32)
            a = (gate * tl.sigmoid(gate) * up).to(w_ptr.dtype.element_ty)
        else:
            a = tl.load(x_ptrs, mask=rows, other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + (k + rk)[None, :])
        acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rows)


@triton.jit
def _split_add_rms_norm_kernel(part_ptr, res_ptr, w_ptr, out_ptr, N, stride_ps, stride_pm, stride_rm,
                               stride_om, eps, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # Every slice's partial sums in one load: a loop would wait out an L2 round trip per slice.
    parts = part_ptr + tl.arange(0, SPLITS)[:, None] * stride_ps + row * stride_pm + cols[None, :]
    h = tl.sum(tl.load(parts, mask=mask[None, :], other=0.0), axis=0)
    dt = res_ptr.dtype.element_ty
    # Rounded where the unfused path rounds: the projection's output, then the new residual.
    res = tl.load(res_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
    res = (res + h.to(dt).to(tl.float32)).to(dt)
    tl.store(res_ptr + row * stride_rm + cols, res, mask=mask)
    x = res.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_om + cols, (x * rstd).to(dt) * w, mask=mask)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, pos_ptr, qw_ptr, kw_ptr, cos_sin_ptr, q_ptr, k_ptr, stride_t, eps,
                         NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HEAD_DIM: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)  # q heads first, then k heads: the order they sit in a qkv row
    HALF: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, HALF)
    src = qkv_ptr + t * stride_t + h * HEAD_DIM
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HALF + offs).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
    if h < NUM_Q:
        w_ptr = qw_ptr
        dst = q_ptr + (t * NUM_Q + h) * HEAD_DIM
    else:
        w_ptr = kw_ptr
        dst = k_ptr + (t * NUM_K + h - NUM_Q) * HEAD_DIM
    dt = q_ptr.dtype.element_ty
    n1 = ((x1 * rstd).to(dt) * tl.load(w_ptr + offs)).to(tl.float32)
    n2 = ((x2 * rstd).to(dt) * tl.load(w_ptr + HALF + offs)).to(tl.float32)
    row = cos_sin_ptr + tl.load(pos_ptr + t).to(tl.int64) * HEAD_DIM
    cos = tl.load(row + offs)
    sin = tl.load(row + HALF + offs)
    tl.store(dst + offs, (n1 * cos - n2 * sin).to(dt))
    tl.store(dst + HALF + offs, (n2 * cos + n1 * sin).to(dt))


def _launch_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 plan: GemmPlan, silu_mul: bool) -> None:
    n, k = weight.shape
    grid = (n // plan.block_n, plan.splits)
    _gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, out, x.shape[0], x.stride(0), weight.stride(0),
        out.stride(-2), out.stride(0) if out.dim() == 3 else 0, k,
        K_PER_SPLIT=k // plan.splits, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        SILU_MUL=silu_mul, HAS_BIAS=bias is not None, num_warps=plan.num_warps, num_stages=plan.num_stages)


def _plan(x: torch.Tensor, weight: torch.Tensor, split: bool, silu_mul: bool) -> GemmPlan | None:
    # 16-bit only: tl.dot would take fp32 inputs as TF32, where F.linear keeps full fp32.
    if weight.dtype not in (torch.bfloat16, torch.float16) or x.dtype != weight.dtype:
        return None
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != (2 * k if silu_mul else k) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return None
    return plan_gemm(x.shape[0], n, k, split, _sm_count(x.device.index or 0))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  silu_mul: bool = False, plan: GemmPlan | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` (of ``silu(gate) * up`` for ``silu_mul``, x = [gate | up])."""
    plan = plan or _plan(x, weight, split=False, silu_mul=silu_mul)
    if plan is None or plan.splits != 1:
        return None
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch_gemm(x, weight, bias, out, plan, silu_mul)
    return out


def linear_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, silu_mul: bool = False,
                        plan: GemmPlan | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``h = x @ weight.T; residual += h; (rms_norm(residual) * norm_weight, residual)``, residual in place."""
    plan = plan or _plan(x, weight, split=True, silu_mul=silu_mul)
    n = weight.shape[0]
    if plan is None or residual.shape != (x.shape[0], n) or residual.dtype != x.dtype or residual.stride(-1) != 1:
        return None
    m = x.shape[0]
    partial = torch.empty((plan.splits, m, n), dtype=torch.float32, device=x.device)
    _launch_gemm(x, weight, None, partial, plan, silu_mul)
    out = torch.empty_like(residual)
    _split_add_rms_norm_kernel[(m,)](
        partial, residual, norm_weight, out, n, partial.stride(0), partial.stride(1), residual.stride(0),
        out.stride(0), eps, SPLITS=plan.splits, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out, residual


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, cos_sin: torch.Tensor, num_q: int, num_k: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q [T, num_q, D], k [T, num_k, D]), both contiguous: RMSNorm per head, then neox RoPE, from
    the q and k parts of ``qkv`` [T, (num_q + 2 num_k) D]; ``cos_sin`` is [positions, D] fp32."""
    if head_dim & (head_dim - 1) or qkv.stride(-1) != 1:
        return None
    t = qkv.shape[0]
    q = torch.empty((t, num_q, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, num_k, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t:
        _qk_norm_rope_kernel[(t, num_q + num_k)](
            qkv, positions, q_weight, k_weight, cos_sin, q, k, qkv.stride(0), eps,
            NUM_Q=num_q, NUM_K=num_k, HEAD_DIM=head_dim, num_warps=1)
    return q, k
