"""Elementwise building blocks of the decoder, in torch (the reference and the CPU path).

Each op matches transformers' arithmetic (RMSNorm in fp32, rotate-half RoPE), so greedy tokens
match the oracle exactly on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conveyor.model.config import RopeConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fixed_tile_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """``F.linear`` whose every GEMM has ``tile`` rows, so a row's result cannot depend on its batch.

    BLAS libraries pick the kernel, and whether to split the K reduction, by the problem's M; a
    token's logits then change with how many tokens share its step. Cut into fixed-height tiles
    (the last one zero-padded), every call is the same [tile, K] x [K, N] problem, and a GEMM
    without data-dependent choices computes each row the same way wherever it sits.
    """
    rows, wt = x.shape[0], weight.t()
    padded = -(-rows // tile) * tile
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = x.new_empty(padded, weight.shape[0])
    for start in range(0, padded, tile):
        torch.mm(x[start:start + tile], wt, out=out[start:start + tile])
    out = out[:rows]  # a view: the padding rows' results are never copied
    return out if bias is None else out + bias


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq


def rope_cos_sin_cache(rope: RopeConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32: each position's cos of every frequency, then its sin (the
    ``cos_sin_cache`` layout of FlashInfer's RoPE and of model/triton_kernels.py)."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(rope, head_dim))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position up to max_positions, built once."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str) -> None:
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
