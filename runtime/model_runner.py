"""Turns a ScheduledBatch into tensors, runs the model, samples, and writes sampled ids to the token pool.

Everything the batch needs is derived from lengths and page tables on the host; input ids are
gathered from the token pool on the device, so a batch never waits for the previous batch's
tokens to reach the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from memory import KVPool, TokenPool
from model.attention import AttentionBackend, AttentionMetadata
from model.decoder import DecoderModel
from model.sampling import Penalties, SamplerOutput, SamplingBatch, sample_with_logprobs
from scheduler import ScheduledBatch


@dataclass(frozen=True)
class PreparedBatch:
    """Host-built inputs of one batch; frozen, and kept alive until the batch's outputs are read."""

    batch: ScheduledBatch
    token_slots: torch.Tensor  # [T] slot of each query token
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] query token whose logits are sampled, per sampling seq
    sample_slots: torch.Tensor  # [S]
    sample_positions: torch.Tensor  # [S] where each sampled id is written in the token pool
    sampling: SamplingBatch


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv_pool: KVPool,
        token_pool: TokenPool,
        backend: AttentionBackend,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.token_pool = token_pool
        self.backend = backend
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        seqs = batch.seqs
        page_size = self.kv_pool.page_size
        lens = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=len(seqs))
        qsl = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(lens, out=qsl[1:])
        # positions: start_i + (t - qsl_i) for each token t of sequence i
        seq_of_token = np.repeat(np.arange(len(seqs)), lens)
        positions = starts[seq_of_token] + (np.arange(qsl[-1]) - qsl[:-1][seq_of_token])
        max_pages = max(len(s.pages) for s in seqs)
        page_table = np.zeros((len(seqs), max_pages), dtype=np.int32)
        for i, s in enumerate(seqs):
            page_table[i, : len(s.pages)] = s.pages
        slot_mapping = page_table[seq_of_token, positions // page_size].astype(np.int64) * page_size + positions % page_size
        slots = np.fromiter((s.slot for s in seqs), dtype=np.int64, count=len(seqs))

        sampling = [i for i, s in enumerate(seqs) if s.samples]
        sampled_seqs = [seqs[i] for i in sampling]
        dev = self.device
        meta = AttentionMetadata(
            num_decodes=batch.num_decodes,
            query_start_loc_cpu=torch.from_numpy(qsl),
            kv_lens_cpu=torch.from_numpy((starts + lens).astype(np.int32)),
            page_table=torch.from_numpy(page_table).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev, non_blocking=True),
            page_size=page_size,
        )
        return PreparedBatch(
            batch=batch,
            token_slots=torch.from_numpy(slots[seq_of_token]).to(dev, non_blocking=True),
            positions=torch.from_numpy(positions).to(dev, non_blocking=True),
            meta=meta,
            logits_indices=torch.from_numpy(qsl[1:][sampling].astype(np.int64) - 1).to(dev, non_blocking=True),
            sample_slots=torch.from_numpy(slots[sampling]).to(dev, non_blocking=True),
            sample_positions=torch.from_numpy((starts + lens)[sampling]).to(dev, non_blocking=True),
            sampling=_sampling_batch(sampled_seqs, dev),
        )

    @torch.inference_mode()
    def execute(self, prepared: PreparedBatch) -> SamplerOutput:
        """Launch the batch; returns the sampled ids [S] (and logprobs) on the device, not yet read back."""
        for w in prepared.batch.pool_writes:
            self.token_pool.write(w.slot, w.start, list(w.token_ids))
        input_ids = self.token_pool.gather(prepared.token_slots, prepared.positions)
        self.backend.plan(prepared.meta)
        hidden = self.model(input_ids, prepared.positions, self.kv_pool.data, self.backend, prepared.meta)
        if prepared.logits_indices.numel() == 0:
            return SamplerOutput(torch.empty(0, dtype=torch.int64, device=self.device), None)
        logits = self.model.compute_logits(hidden[prepared.logits_indices])
        sampling = prepared.sampling
        if sampling.penalties is not None:
            # The history is read on the device, after this batch's own pool writes: the previous
            # batch's sampled ids are in it even if the host has not seen them yet.
            history = self.token_pool.ids[prepared.sample_slots, : sampling.penalties.history.shape[1]]
            sampling = replace(sampling, penalties=replace(sampling.penalties, history=history))
        out = sample_with_logprobs(logits, sampling, self.generator)
        self.token_pool.scatter(prepared.sample_slots, prepared.sample_positions, out.token_ids)
        return out


def _sampling_batch(seqs: list, device: torch.device) -> SamplingBatch:
    params = [s.request.params for s in seqs]
    penalties = None
    if any(p.has_penalties for p in params):
        lengths = [s.kv_len for s in seqs]
        penalties = Penalties(
            presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
            frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
            repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device),
            history=torch.empty((len(seqs), max(lengths)), dtype=torch.int32),  # shape only; filled at launch
            prompt_lens=torch.tensor([s.request.num_prompt_tokens for s in seqs], device=device),
            lengths=torch.tensor(lengths, device=device),
        )
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingBatch.build(
        temperature=[p.temperature for p in params],
        top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
        seeds=[p.seed for p in params],
        steps=[s.sample_index for s in seqs],
        device=device,
        penalties=penalties,
        max_logprobs=max(wanted) if wanted else None,
    )
