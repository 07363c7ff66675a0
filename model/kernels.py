"""Kernel sets behind the decoder: plain torch (CPU, the reference) and FlashInfer (CUDA).

The decoder calls these methods and nothing else, so the same model code runs both ways.

``linear_tile``: batch-invariant GEMMs (model.ops.fixed_tile_linear), for ``--batch-invariant``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
import torch.nn.functional as F

from conveyor.model.config import RopeConfig
from conveyor.model.ops import RotaryEmbedding, fixed_tile_linear, rms_norm, rope_cos_sin_cache, silu_and_mul


class _Composed:
    """Linear and the fused steps around it, composed from a kernel set's own ops: the reference
    arithmetic, and the fallback wherever a fused kernel does not cover a shape."""

    linear_tile: int | None  # rows per GEMM tile; None: plain F.linear
    head_dim: int

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear_tile is None:
            return F.linear(x, weight, bias)
        return fixed_tile_linear(x, weight, bias, self.linear_tile)

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                            norm_weight: torch.Tensor, eps: float,
                            silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``add_rms_norm(linear(x), residual)``; of ``silu_and_mul(x)`` for ``silu_mul``."""
        if silu_mul:
            x = self.silu_and_mul(x)
        return self.add_rms_norm(self.linear(x, weight), residual, norm_weight, eps)

    def qk_norm_rope(self, qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
                     k_weight: torch.Tensor, eps: float, num_q: int, num_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's per-head RMSNorm of q and k (read from the qkv output), then RoPE."""
        t, d = qkv.shape[0], self.head_dim
        q = qkv[:, : num_q * d].reshape(t, num_q, d)
        k = qkv[:, num_q * d: (num_q + num_k) * d].reshape(t, num_k, d)
        return self.rope(self.rms_norm(q, q_weight, eps), self.rms_norm(k, k_weight, eps), positions)

    # Each kernel set's own ops.
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchKernels(_Composed):
    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str,
                 linear_tile: int | None = None) -> None:
        self.rotary = RotaryEmbedding(rope, head_dim, max_positions, device)
        self.linear_tile = linear_tile
        self.head_dim = head_dim

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


class FlashInferKernels(_Composed):
    """FlashInfer's fused norm, RoPE and activation kernels (the ones in the sm90 kit); cuBLAS GEMMs.

    ``fused``: steps of up to ``triton_kernels.MAX_ROWS`` rows run model/triton_kernels.py instead,
    where it covers the shape. The worker turns it off with ``enforce_eager``: launched eagerly, a
    Triton kernel costs more host time than it saves (inside graphs it costs none).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str,
                 linear_tile: int | None = None, fused: bool = False) -> None:
        self.linear_tile = linear_tile
        self._triton = _triton_kernels() if fused and linear_tile is None else None
        # The CuTe-DSL norm kernels are not in the prebuilt kit; the CUDA ones are.
        os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")
        import flashinfer

        self._fi = flashinfer
        self.head_dim = head_dim
        self.cos_sin = rope_cos_sin_cache(rope, head_dim, max_positions).to(device)

    def _small(self, x: torch.Tensor) -> ModuleType | None:
        """The Triton kernels when this step is small enough for them, else None."""
        return self._triton if self._triton is not None and x.shape[0] <= self._triton.MAX_ROWS else None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (tk := self._small(x)) is not None and (out := tk.skinny_linear(x, weight, bias)) is not None:
            return out
        return super().linear(x, weight, bias)

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                            norm_weight: torch.Tensor, eps: float,
                            silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if (tk := self._small(x)) is not None:
            fused = tk.linear_add_rms_norm(x, weight, residual, norm_weight, eps, silu_mul)
            if fused is not None:
                return fused
        return super().linear_add_rms_norm(x, weight, residual, norm_weight, eps, silu_mul)

    def qk_norm_rope(self, qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
                     k_weight: torch.Tensor, eps: float, num_q: int, num_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (tk := self._small(qkv)) is not None:
            fused = tk.qk_norm_rope(qkv, positions, q_weight, k_weight, eps, self.cos_sin, num_q, num_k, self.head_dim)
            if fused is not None:
                return fused
        return super().qk_norm_rope(qkv, positions, q_weight, k_weight, eps, num_q, num_k)

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


def _triton_kernels() -> ModuleType | None:
    """model.triton_kernels, or None where Triton is not installed (it comes with CUDA torch)."""
    try:
        from conveyor.model import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def make_kernels(rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device,
                 linear_tile: int | None = None, fused: bool = False) -> TorchKernels | FlashInferKernels:
    if device.type == "cuda":
        return FlashInferKernels(rope, head_dim, max_positions, device, linear_tile, fused)
    return TorchKernels(rope, head_dim, max_positions, device, linear_tile)



