"""Megatron tensor parallelism for the decoder: which slice of each weight a rank holds, and the
collectives that join the slices (``torch.distributed``: NCCL on CUDA, gloo on CPU, one code path).

Column-parallel qkv and gate_up (each rank holds its heads' and its intermediate columns' rows),
row-parallel o_proj and down_proj (each rank holds the matching input columns; the partial sums
are all-reduced), a vocab-parallel embedding (rows of the vocabulary; the lookups are all-reduced)
and LM head (all-gathered). KV heads split across ranks, or are replicated when there are fewer
of them than ranks. A rank's model is built from ``shard_config``: the same decoder with local
sizes, so the loader, the KV pool and the attention backend need to know nothing about TP.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import torch
import torch.distributed as dist

from conveyor.model.config import ModelConfig, ModelConfigError

# torch 2.13 renamed all_gather_into_tensor (deprecated since); pyproject allows torch >= 2.5.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TensorParallel:
    """One rank's view of the group: its rank, the group size and the collectives the decoder calls.

    Collectives are issued on the current stream's order (NCCL synchronises its stream with it, so
    they are captured in CUDA graphs like any kernel), and every rank issues them in the same order.
    """

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.size = size
        self.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[T, N] on each rank -> [T, size * N], rank r's columns at r * N."""
        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], x.shape[1]))
        _all_gather_single(out, x, group=self.group)
        return out.view(self.size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=src, group=self.group)
        return x

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value`` (a host sync: startup only)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def all_equal(self, value: int, device: torch.device) -> bool:
        """Whether every rank holds the same ``value`` (a host sync: debug checks only)."""
        t = torch.tensor([value, -value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0].item()) == value and int(t[1].item()) == -value


class Span(NamedTuple):
    """Rows [start, stop) of a full tensor along ``dim``; ``size`` rows locally (the rest zero padding)."""

    dim: int
    start: int
    stop: int
    size: int


class Sharding:
    """The slice of every weight that rank ``rank`` of ``size`` holds, for a model of ``cfg`` (full sizes)."""

    def __init__(self, cfg: ModelConfig, rank: int, size: int) -> None:
        check_shardable(cfg, size)
        self.cfg, self.rank, self.size = cfg, rank, size
        d = cfg.head_dim
        hq = cfg.num_heads // size
        self.q = Span(0, rank * hq * d, (rank + 1) * hq * d, hq * d)
        if cfg.num_kv_heads >= size:
            hkv = cfg.num_kv_heads // size
            self.kv = Span(0, rank * hkv * d, (rank + 1) * hkv * d, hkv * d)
        else:  # replicated: ranks r*kv//size share one head, the one their query heads read
            head = rank * cfg.num_kv_heads // size
            self.kv = Span(0, head * d, (head + 1) * d, d)
        inter = cfg.intermediate_size // size
        self.inter = Span(0, rank * inter, (rank + 1) * inter, inter)
        vocab = -(-cfg.vocab_size // size)
        self.vocab = Span(0, rank * vocab, min((rank + 1) * vocab, cfg.vocab_size), vocab)

    def local_config(self) -> ModelConfig:
        return msgspec.structs.replace(
            self.cfg, num_heads=self.cfg.num_heads // self.size, num_kv_heads=self.kv.size // self.cfg.head_dim,
            intermediate_size=self.inter.size, vocab_size=self.vocab.size,
        )

    def hf_span(self, name: str) -> Span | None:
        """The slice of the HF-named tensor this rank loads; None: replicated (norms)."""
        rest = name.rsplit(".", 2)
        leaf = ".".join(rest[-2:])  # e.g. "q_proj.weight"
        if leaf in ("q_proj.weight", "q_proj.bias"):
            return self.q
        if leaf in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            return self.kv
        if leaf in ("gate_proj.weight", "up_proj.weight"):
            return self.inter
        if leaf == "o_proj.weight":
            return self.q._replace(dim=1)
        if leaf == "down_proj.weight":
            return self.inter._replace(dim=1)
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            return self.vocab
        return None

    def slice_fused(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of one of our (fused) parameters, from its full tensor (dummy weights)."""
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            q, kv = self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim
            parts = full.split([q, kv, kv])
            return torch.cat([take(parts[0], self.q), take(parts[1], self.kv), take(parts[2], self.kv)])
        if name.endswith("gate_up_proj.weight"):
            return torch.cat([take(p, self.inter) for p in full.chunk(2)])
        if name.endswith("o_proj.weight"):
            return take(full, self.q._replace(dim=1))
        if name.endswith("down_proj.weight"):
            return take(full, self.inter._replace(dim=1))
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            return take(full, self.vocab)
        return full


def take(full: torch.Tensor, span: Span) -> torch.Tensor:
    """``full``'s rows of ``span`` along its dim, zero-padded to the local size."""
    part = full.narrow(span.dim, span.start, span.stop - span.start)
    missing = span.size - part.shape[span.dim]
    if missing:
        pad = list(part.shape)
        pad[span.dim] = missing
        part = torch.cat([part, part.new_zeros(pad)], dim=span.dim)
    return part


def check_shardable(cfg: ModelConfig, size: int) -> None:
    """Raise if ``cfg`` cannot be split ``size`` ways."""
    if size < 1:
        raise ModelConfigError(f"tensor_parallel_size must be >= 1, got {size}")
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        problems.append(f"{cfg.num_kv_heads} KV heads (they must divide the ranks or the ranks them)")
    if cfg.intermediate_size % size:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if problems:
        raise ModelConfigError(f"tensor_parallel_size {size} does not divide the model's {', '.join(problems)}")
