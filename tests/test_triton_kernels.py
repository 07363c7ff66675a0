"""model/triton_kernels.py under Triton's CPU interpreter: the kernels' indexing, masks, split-K
reduction and fusions against the torch reference, without a GPU (tests/test_gpu.py runs them
compiled, in bf16, on the device).

The interpreter runs fp16, not bf16 (it computes on numpy arrays, which have no bf16), so these
check the arithmetic's structure; the bf16 rounding is the GPU tests' job.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():  # compiled, in bf16: tests/test_gpu.py
    pytest.skip("the interpreter runs where there is no GPU", allow_module_level=True)

from conveyor.model import triton_kernels  # noqa: E402
from conveyor.model.config import RopeConfig  # noqa: E402
from conveyor.model.kernels import TorchKernels  # noqa: E402
from conveyor.model.ops import rope_cos_sin_cache  # noqa: E402

DT = torch.float16


@pytest.fixture
def tk(monkeypatch):
    assert type(triton_kernels._gemm_kernel).__name__ == "InterpretedFunction"  # conftest set the flag in time
    monkeypatch.setattr(triton_kernels, "_sm_count", lambda device_index: 132)  # an H200's
    return triton_kernels


def reference() -> TorchKernels:
    return TorchKernels(RopeConfig(), 64, 16, "cpu")


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("n,k", [(256, 128), (96, 192)])
def test_skinny_linear_matches_f_linear(tk, rows, n, k):
    torch.manual_seed(rows + n)
    w, b = torch.randn(n, k, dtype=DT) * 0.1, torch.randn(n, dtype=DT)
    x = torch.randn(rows, k, dtype=DT)
    out = tk.skinny_linear(x, w, b, plan=tk.GemmPlan(16 if rows <= 16 else 64, 16, 64, 1))
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_k_projection_with_add_and_norm_matches_the_reference(tk, rows, silu_mul, splits):
    torch.manual_seed(rows * 7 + splits)
    n, k = 96, 256
    w = torch.randn(n, k, dtype=DT) * 0.1
    x = torch.randn(rows, 2 * k if silu_mul else k, dtype=DT)
    residual = torch.randn(rows, n, dtype=DT)
    norm_w = torch.rand(n, dtype=DT) + 0.5
    want_h, want_res = reference().linear_add_rms_norm(x, w, residual.clone(), norm_w, 1e-6, silu_mul=silu_mul)
    h, res = tk.linear_add_rms_norm(x, w, residual, norm_w, 1e-6, silu_mul, plan=tk.GemmPlan(16, 32, 64, splits))
    assert res is residual  # updated in place, as FlashInfer's fused_add_rmsnorm does
    torch.testing.assert_close(res, want_res, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h, want_h, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (3, 1, 32)])
def test_qk_norm_rope_matches_the_reference(tk, heads, kv_heads, head_dim):
    torch.manual_seed(head_dim)
    rope = RopeConfig(theta=1e4)
    ref = TorchKernels(rope, head_dim, 64, "cpu")
    cos_sin = rope_cos_sin_cache(rope, head_dim, 64)  # FlashInferKernels' table
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, dtype=DT)
    positions = torch.tensor([0, 5, 63], dtype=torch.int32)
    wq, wk = torch.rand(head_dim, dtype=DT) + 0.5, torch.rand(head_dim, dtype=DT) + 0.5
    want_q, want_k = ref.qk_norm_rope(qkv, positions.long(), wq, wk, 1e-6, heads, kv_heads)
    q, k = tk.qk_norm_rope(qkv, positions, wq, wk, 1e-6, cos_sin, heads, kv_heads, head_dim)
    torch.testing.assert_close(q, want_q, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(k, want_k, rtol=1e-2, atol=1e-2)


def test_plans_cover_the_decoder_shapes_and_refuse_the_rest(tk):
    # qwen3-0.6b at one row on 132 SMs: the CTAs cover at least half the SMs, all of them when split
    for n, k, split in ((4096, 1024, False), (6144, 1024, False), (1024, 2048, True), (1024, 3072, True)):
        plan = tk.plan_gemm(1, n, k, split, 132)
        assert plan is not None and (n // plan.block_n) * plan.splits >= (120 if split else 66), (n, k, plan)
        assert k % (plan.splits * plan.block_k) == 0 and plan.splits & (plan.splits - 1) == 0
    assert tk.plan_gemm(tk.MAX_ROWS + 1, 4096, 1024, False, 132) is None  # cuBLAS's turn
    assert tk.plan_gemm(1, 1000, 1024, False, 132) is None  # N not a multiple of 16
    assert tk.plan_gemm(1, 1024, 1000, False, 132) is None
