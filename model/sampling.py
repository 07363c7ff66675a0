"""Token sampling in torch: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Penalties read each row's token history from the token pool on the device, so they stay right
when the previous batch's tokens have not reached the host yet (overlap).

A seeded request draws its noise from a generator seeded by (seed, output index), so its tokens
do not depend on which other requests share the batch, nor on the pipeline depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier: spreads (seed, step) pairs apart


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one batch, built on the host from lengths and params only.

    The ``all_greedy`` / ``any_*`` flags are decided on the host when the batch is built, so the
    sampler never asks the device which path to take (that question would be a host sync).
    """

    temperature: torch.Tensor  # [B] fp32; 0 = greedy
    top_k: torch.Tensor  # [B] int32; 0 = off
    top_p: torch.Tensor  # [B] fp32; 1 = off
    min_p: torch.Tensor  # [B] fp32; 0 = off
    seeds: list[int | None]  # per row
    steps: list[int]  # per row: index of the token being sampled (for seeded noise)
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool
    penalties: "Penalties | None" = None
    max_logprobs: int | None = None  # None: no row wants logprobs
    # logit_bias and min_tokens bans, sparse: logits[rows[i], ids[i]] += values[i] (-inf bans)
    bias: "Bias | None" = None
    # [B, ceil(V/32)] int32 bitmask of allowed tokens (structured outputs), set just before sampling
    token_bitmask: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        min_p: list[float],
        seeds: list[int | None],
        steps: list[int],
        device: torch.device | str = "cpu",
        penalties: "Penalties | None" = None,
        max_logprobs: int | None = None,
    ) -> "SamplingBatch":
        all_greedy = all(t == 0 for t in temperature)
        b = len(temperature)
        if all_greedy or torch.device(device).type == "cpu":
            # An all-greedy batch samples by argmax alone and never reads these rows on the device:
            # they stay on the host.
            rows = torch.tensor([temperature, top_p, min_p], dtype=torch.float32)
            k_row = torch.tensor(top_k, dtype=torch.int32)
        else:
            # One pinned buffer, one copy: top_k's int32 bits ride in the float32 buffer's last row.
            host = torch.empty(4, b, dtype=torch.float32, pin_memory=True)
            h = host.numpy()
            h[0], h[1], h[2] = temperature, top_p, min_p
            h[3].view(np.int32)[:] = top_k
            packed = host.to(device, non_blocking=True)
            rows, k_row = packed[:3], packed[3].view(torch.int32)
        return cls(
            temperature=rows[0],
            top_k=k_row,
            top_p=rows[1],
            min_p=rows[2],
            seeds=seeds,
            steps=steps,
            all_greedy=all_greedy,
            any_top_k_top_p=any(k > 0 for k in top_k) or any(p < 1 for p in top_p),
            any_min_p=any(m > 0 for m in min_p),
            penalties=penalties,
            max_logprobs=max_logprobs,
        )


@dataclass(frozen=True)
class Penalties:
    """OpenAI presence/frequency penalties over output tokens, HF/vLLM repetition penalty over all tokens."""

    presence: torch.Tensor  # [B] fp32
    frequency: torch.Tensor  # [B] fp32
    repetition: torch.Tensor  # [B] fp32; 1 = off
    history: torch.Tensor  # [B, L] int32 token ids, device (from the token pool)
    prompt_lens: torch.Tensor  # [B] int64, device
    lengths: torch.Tensor  # [B] int64, device: tokens in history (prompt + outputs so far)


class Bias(NamedTuple):
    rows: torch.Tensor  # [N] int64, device
    ids: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] fp32


class Logprobs(NamedTuple):
    sampled: torch.Tensor  # [B] logprob of the sampled token
    top_ids: torch.Tensor  # [B, k]
    top_values: torch.Tensor  # [B, k]


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    logprobs: Logprobs | None


def sample_with_logprobs(logits: torch.Tensor, params: SamplingBatch,
                         generator: torch.Generator | None = None) -> SamplerOutput:
    # Logprobs are the model's own distribution (vLLM's default "raw" logprobs): before penalties
    # and temperature, so they do not change with the sampling settings.
    raw = torch.log_softmax(logits, dim=-1) if params.max_logprobs is not None else None
    if params.penalties is not None:
        logits = apply_penalties(logits, params.penalties)
    if params.bias is not None:
        logits = logits.index_put((params.bias.rows, params.bias.ids), params.bias.values, accumulate=True)
    if params.token_bitmask is not None:
        logits = apply_token_bitmask(logits, params.token_bitmask)
    ids = sample(logits, params, generator)
    if raw is None:
        return SamplerOutput(ids, None)
    top = raw.topk(params.max_logprobs, dim=-1) if params.max_logprobs > 0 else None
    empty = raw[:, :0]
    return SamplerOutput(ids, Logprobs(
        sampled=raw.gather(1, ids.unsqueeze(1)).squeeze(1),
        top_ids=top.indices if top is not None else empty.long(),
        top_values=top.values if top is not None else empty,
    ))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where the row's bit is 0 (bit j of word w is token 32 w + j). Device ops only: no host sync."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :vocab]
    return logits.masked_fill(bits == 0, float("-inf"))


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    b, length = p.history.shape
    pos = torch.arange(length, device=logits.device).unsqueeze(0)
    known = pos < p.lengths.unsqueeze(1)
    is_output = known & (pos >= p.prompt_lens.unsqueeze(1))
    ids = p.history.clamp(min=0).long()
    out_counts = torch.zeros_like(logits).scatter_add_(1, ids, is_output.to(logits.dtype))
    seen = torch.zeros_like(logits).scatter_add_(1, ids, known.to(logits.dtype)) > 0
    rep = p.repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - p.frequency.unsqueeze(1) * out_counts
    return logits - p.presence.unsqueeze(1) * (out_counts > 0).to(logits.dtype)


def sample(logits: torch.Tensor, params: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] int64."""
    greedy_ids = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy_ids
    is_greedy = params.temperature == 0
    if logits.is_cuda:
        ids = _flashinfer_sample(logits, params, generator)
        if any(seed is not None for seed in params.seeds):
            # FlashInfer's per-row seeds still depend on the row's place in the batch; a seeded
            # request must not, so its rows take the torch path.
            seeded = torch.tensor([seed is not None for seed in params.seeds]).to(logits.device, non_blocking=True)
            ids = torch.where(seeded, _torch_sample(logits, params, generator), ids)
    else:
        ids = _torch_sample(logits, params, generator)
    return torch.where(is_greedy, greedy_ids, ids)


def _torch_sample(logits: torch.Tensor, params: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    dev = logits.device
    temp = params.temperature
    probs = torch.softmax(logits / torch.where(temp == 0, 1.0, temp).unsqueeze(1), dim=-1)
    probs = _apply_filters(probs, params)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, (seed, step) in enumerate(zip(params.seeds, params.steps)):
        if seed is not None:
            g = torch.Generator(device=dev).manual_seed((seed * _SEED_MIX + step) % 2**63)
            noise[row].exponential_(generator=g)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), without a CPU round trip.
    return (probs / noise).argmax(dim=-1)


def _flashinfer_sample(logits: torch.Tensor, params: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    import flashinfer.sampling as fs

    vocab = logits.shape[-1]
    temp = torch.where(params.temperature == 0, 1.0, params.temperature)
    probs = fs.softmax(logits, temperature=temp)
    # top_k goes in as an int32 device tensor: a small Python int would take a fast path whose
    # kernel is not in the prebuilt kit.
    top_k = torch.where(params.top_k > 0, params.top_k, vocab).to(torch.int32)
    if params.any_min_p:
        if params.any_top_k_top_p:
            probs = fs.top_p_renorm_probs(fs.top_k_renorm_probs(probs, top_k), params.top_p)
        ids = fs.min_p_sampling_from_probs(probs, params.min_p, generator=generator)
    elif params.any_top_k_top_p:
        ids = fs.top_k_top_p_sampling_from_probs(probs, top_k, params.top_p, generator=generator)
    else:
        ids = fs.sampling_from_probs(probs, generator=generator)
    return ids.long()


def _apply_filters(probs: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    vocab = probs.shape[-1]
    top_k, top_p, min_p = params.top_k, params.top_p, params.min_p
    if params.any_top_k_top_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=probs.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        sorted_p = sorted_p.masked_fill(rank >= k, 0.0)
        # top-p over what top-k kept (as vLLM does): keep the smallest prefix reaching top_p of its
        # mass; the first token is always kept.
        mass_before = (sorted_p.cumsum(dim=-1) - sorted_p) / sorted_p.sum(dim=-1, keepdim=True)
        sorted_p = sorted_p.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if params.any_min_p:
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
