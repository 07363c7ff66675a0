"""Kernel sets behind the decoder: plain torch (CPU, the reference) and FlashInfer (CUDA).

The decoder calls these methods and nothing else, so the same model code runs both ways.

``linear_tile``: batch-invariant GEMMs (model.ops.fixed_tile_linear), for ``--batch-invariant``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from conveyor.model.config import RopeConfig
from conveyor.model.ops import RotaryEmbedding, fixed_tile_linear, rms_norm, rope_inv_freq, silu_and_mul


class _Linear:
    linear_tile: int | None  # rows per GEMM tile; None: plain F.linear

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear_tile is None:
            return F.linear(x, weight, bias)
        return fixed_tile_linear(x, weight, bias, self.linear_tile)


class TorchKernels(_Linear):
    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str,
                 linear_tile: int | None = None) -> None:
        self.rotary = RotaryEmbedding(rope, head_dim, max_positions, device)
        self.linear_tile = linear_tile

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x), in the order transformers computes them."""
        residual = residual + x
        return rms_norm(residual, weight, eps), residual

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(q, k, positions)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class FlashInferKernels(_Linear):
    """FlashInfer's fused norm, RoPE and activation kernels (the ones in the sm90 kit); cuBLAS GEMMs."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str,
                 linear_tile: int | None = None) -> None:
        self.linear_tile = linear_tile
        # The CuTe-DSL norm kernels are not in the prebuilt kit; the CUDA ones are.
        os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")
        import flashinfer

        self._fi = flashinfer
        self.head_dim = head_dim
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(rope, head_dim))
        # [max_pos, head_dim] fp32: cos of each frequency, then sin (FlashInfer's cos_sin_cache layout).
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device).contiguous()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # A 3-D x is Qwen3's per-head q/k norm on a strided view of the qkv output: the 3-D kernel
        # reads it in place, where reshaping to 2-D would first copy it (measured 3x slower per
        # call on an H100 by scripts/bench_decode_kernels.py). The output is contiguous, so RoPE
        # and attention need no copy either.
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return self._fi.rmsnorm(x, weight, eps, out=out)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # In place: residual <- residual + x, x <- rmsnorm(residual) * weight.
        self._fi.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = q.shape[0]
        q2, k2 = q.reshape(t, -1), k.reshape(t, -1)
        self._fi.apply_rope_with_cos_sin_cache_inplace(positions, q2, k2, self.head_dim, self.cos_sin, is_neox=True)
        return q2.view(q.shape), k2.view(k.shape)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fi.silu_and_mul(x)


def make_kernels(rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device,
                 linear_tile: int | None = None) -> TorchKernels | FlashInferKernels:
    kind = FlashInferKernels if device.type == "cuda" else TorchKernels
    return kind(rope, head_dim, max_positions, device, linear_tile)



