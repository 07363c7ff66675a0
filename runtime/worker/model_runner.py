"""Turns a ScheduledBatch into tensors, runs the model, samples, and writes sampled ids to the token pool.

Everything the batch needs is derived from lengths and page tables on the host; input ids are
gathered from the token pool on the device, so a batch never waits for the previous batch's
tokens to reach the host. Decode-only batches replay a CUDA graph when one is captured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from conveyor.memory.device import KVPool, PinnedStaging, TokenPool
from conveyor.memory.device.kv_swapper import KVSwapper
from conveyor.model.attention import AttentionBackend, AttentionMetadata
from conveyor.model.decoder import DecoderModel
from conveyor.model.sampling import (
    Bias,
    Penalties,
    SamplerOutput,
    SamplingBatch,
    sample_with_logprobs,
)
from conveyor.runtime.worker.grammar_mask import GrammarBatch
from conveyor.scheduler import SamplingParams, ScheduledBatch, ScheduledSeq

if TYPE_CHECKING:
    from conveyor.runtime.worker.cuda_graphs import DecodeGraphs
    from conveyor.runtime.worker.piecewise_graphs import PiecewiseGraphs


@dataclass(frozen=True)
class PreparedBatch:
    """Inputs of one batch; frozen, and kept alive until the batch's outputs are read."""

    batch: ScheduledBatch
    token_slots: torch.Tensor  # [T] slot of each query token (padded rows: the padding slot)
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] query token whose logits are sampled, per sampling seq
    sample_slots: torch.Tensor  # [S]
    sample_positions: torch.Tensor  # [S] where each sampled id is written in the token pool
    sampling: SamplingBatch
    graph_batch_size: int | None  # replay the decode graph of this size, or run eagerly
    piece_size: int | None  # else run the piecewise graphs of this many (padded) tokens
    grammar: GrammarBatch | None = None  # some sampling row is constrained: its mask is filled after launch
    prompt_lp: PromptLogprobsBatch | None = None  # some chunk computes prompt logprobs


class PromptLogprobsBatch:
    """Which query tokens' logits score the next prompt token; the result is set by the forward.

    ``spans``: (seq index in the batch, first scored prompt position, count). ``result`` holds device
    tensors (target logprob, its rank, top ids, top values) until the executor reads them back.
    """

    def __init__(self, spans: list[tuple[int, int, int]], token_index: torch.Tensor, targets: torch.Tensor,
                 k: int) -> None:
        self.spans = spans
        self.token_index = token_index
        self.targets = targets
        self.k = k
        self.result: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def staging_regions(max_tokens: int, max_seqs: int, max_pages_per_seq: int) -> dict[str, int]:
    return {
        # A decode step writes only the front of these nine regions (the decode graphs' inputs), which
        # PinnedStaging.stage then sends in one copy: keep them first and together.
        "kv_indptr": max_seqs + 1, "kv_last_page_len": max_seqs, "logits_indices": max_seqs,
        "sample_slots": max_seqs, "sample_positions": max_seqs,
        "decode_token_slots": max_seqs, "decode_positions": max_seqs, "decode_batch_indices": max_seqs,
        # Prefix caching shares pages between sequences, so the pool size does not bound a batch's
        # page list; every sequence holding a full page table does.
        "kv_indices": max_seqs * max_pages_per_seq,
        "token_slots": max_tokens, "positions": max_tokens, "batch_indices": max_tokens,
        # The torch backend's page table and KV slot per token; FlashInfer reads the CSR lists.
        "slot_mapping": max_tokens, "page_table": max_seqs * max_pages_per_seq,
    }


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv_pool: KVPool,
        token_pool: TokenPool,
        backend: AttentionBackend,
        staging: PinnedStaging,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.token_pool = token_pool
        self.backend = backend
        self.staging = staging
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.graphs: DecodeGraphs | None = None
        self.pieces: PiecewiseGraphs | None = None  # prefill and mixed batches
        self.swapper: KVSwapper | None = None  # set with --preemption-mode swap
        self.eos_token_ids: tuple[int, ...] = ()  # what min_tokens masks (with each request's stop ids)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        seqs = batch.seqs
        page_size = self.kv_pool.page_size
        n = len(seqs)
        lens = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=n)
        starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=n)
        slots = np.fromiter((s.slot for s in seqs), dtype=np.int64, count=n)
        prompt_spans = _prompt_spans(seqs)
        graph_bs = None
        if self.graphs is not None and batch.num_decodes == n and not prompt_spans:
            graph_bs = self.graphs.batch_size_for(n)
        if graph_bs is not None and graph_bs > n:
            # Padded rows decode one token at position 0 of the padding slot into reserved page 0.
            pad = graph_bs - n
            lens = np.concatenate([lens, np.ones(pad, dtype=np.int64)])
            starts = np.concatenate([starts, np.zeros(pad, dtype=np.int64)])
            slots = np.concatenate([slots, np.full(pad, self.token_pool.padding_slot, dtype=np.int64)])
        rows = len(lens)
        qsl = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lens, out=qsl[1:])
        seq_of_token = np.repeat(np.arange(rows), lens)
        positions = starts[seq_of_token] + (np.arange(qsl[-1]) - qsl[:-1][seq_of_token])
        kv_lens = (starts + lens).astype(np.int32)
        pages_used = (kv_lens + page_size - 1) // page_size
        kv_indptr = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(pages_used, out=kv_indptr[1:])
        # CSR page lists; padded rows read the reserved page 0.
        kv_indices = np.zeros(int(kv_indptr[-1]), dtype=np.int32)
        if n:
            kv_indices[: kv_indptr[n]] = np.concatenate(
                [np.asarray(s.pages[:k], dtype=np.int32) for s, k in zip(seqs, pages_used.tolist())])
        paged = {}
        if self.backend.uses_page_table:
            width = max(int(pages_used.max()), 1)
            page_table = np.zeros((rows, width), dtype=np.int32)  # unused entries: page 0
            page_table[np.arange(width)[None, :] < pages_used[:, None]] = kv_indices
            paged = {"page_table": page_table.reshape(-1),
                     "slot_mapping": kv_indices[kv_indptr[seq_of_token] + positions // page_size] * page_size
                     + positions % page_size}
        kv_last_page_len = kv_lens - (pages_used - 1) * page_size
        sampling = [i for i, s in enumerate(seqs) if s.samples]
        num_tokens = int(qsl[-1])
        token_slots = slots[seq_of_token]
        piece_size = None
        if graph_bs is None and self.pieces is not None:
            piece_size = self.pieces.size_for(num_tokens)
        if piece_size is not None and piece_size > num_tokens:
            # Padded rows gather position 0 of the padding slot; attention never sees them.
            pad = piece_size - num_tokens
            token_slots = np.concatenate([token_slots, np.full(pad, self.token_pool.padding_slot, dtype=np.int64)])
            positions = np.concatenate([positions, np.zeros(pad, dtype=positions.dtype)])
        # A decode graph reads its per-token inputs from regions beside the per-sequence ones, so a
        # decode step's whole staging goes to the device in one copy.
        tok = "decode_" if graph_bs else ""
        arrays = {
            "kv_indptr": kv_indptr, "kv_last_page_len": kv_last_page_len, "kv_indices": kv_indices,
            tok + "token_slots": token_slots, tok + "positions": positions, tok + "batch_indices": seq_of_token,
            "logits_indices": np.arange(len(sampling)) if graph_bs else qsl[1:][sampling] - 1,
            "sample_slots": slots[sampling], "sample_positions": (starts + lens)[sampling], **paged,
        }
        staged = self.staging.stage(arrays)
        meta = AttentionMetadata(
            num_decodes=rows if graph_bs else batch.num_decodes,
            query_start_loc_cpu=torch.from_numpy(qsl),
            kv_lens_cpu=torch.from_numpy(kv_lens),
            page_table=staged["page_table"].view(rows, -1) if "page_table" in staged else None,
            slot_mapping=staged.get("slot_mapping"),
            page_size=page_size,
            kv_indptr_cpu=torch.from_numpy(kv_indptr),
            kv_indices=staged["kv_indices"],
            kv_last_page_len_cpu=torch.from_numpy(kv_last_page_len.astype(np.int32)),
            kv_indptr=staged["kv_indptr"],
            kv_last_page_len=staged["kv_last_page_len"],
            batch_indices=staged[tok + "batch_indices"],
            positions=staged[tok + "positions"][:num_tokens],
        )
        return PreparedBatch(
            batch=batch,
            token_slots=staged[tok + "token_slots"],
            positions=staged[tok + "positions"],
            meta=meta,
            logits_indices=staged["logits_indices"],
            sample_slots=staged["sample_slots"],
            sample_positions=staged["sample_positions"],
            sampling=_sampling_batch([seqs[i] for i in sampling], self.device, self.eos_token_ids),
            graph_batch_size=graph_bs,
            piece_size=piece_size,
            grammar=_grammar_batch([seqs[i] for i in sampling], self.model.output_vocab, self.device),
            prompt_lp=_prompt_lp_batch(seqs, prompt_spans, qsl, self.device),
        )

    def execute(self, prepared: PreparedBatch) -> SamplerOutput:
        """Launch the batch; returns the sampled ids [S] (and logprobs) on the device, not yet read back."""
        return self.sample(prepared, self.forward(prepared))

    def plan(self, prepared: PreparedBatch) -> None:
        """The host half of the attention kernels' set-up (FlashInfer's plan), before anything launches."""
        if prepared.graph_batch_size is not None:
            assert self.graphs is not None
            self.graphs.plan(prepared.graph_batch_size, prepared.meta)
        else:
            self.backend.plan(prepared.meta)

    def forward(self, prepared: PreparedBatch) -> torch.Tensor | None:
        """Plan and launch the batch's forward; its logits [S, V] (None: nothing samples). Reads no mask."""
        self.plan(prepared)
        return self.launch_forward(prepared)

    @torch.inference_mode()
    def launch_forward(self, prepared: PreparedBatch) -> torch.Tensor | None:
        """``forward`` once planned: every kernel here is the batch's device time."""
        if prepared.batch.swaps:
            assert self.swapper is not None, "a swap was scheduled without a swapper"
            self.swapper.run(prepared.batch.swaps)
        self.token_pool.repoison(prepared.batch.freed_slots)  # before the new owners' writes
        for w in prepared.batch.pool_writes:
            self.token_pool.write(w.slot, w.start, list(w.token_ids))
        num_samples = prepared.logits_indices.shape[0]
        if prepared.graph_batch_size is not None:
            assert self.graphs is not None
            return self.graphs.replay(prepared.graph_batch_size)[:num_samples]
        if prepared.piece_size is not None:
            assert self.pieces is not None
            hidden = self.pieces.run(prepared.piece_size, prepared.batch.num_tokens, self.backend, prepared.meta,
                                     prepared.token_slots, prepared.positions)
        else:
            input_ids = self.token_pool.gather(prepared.token_slots, prepared.positions)
            hidden = self.model(input_ids, prepared.positions, self.kv_pool.data, self.backend, prepared.meta)
        if prepared.prompt_lp is not None:
            _score_prompt(self.model, hidden, prepared.prompt_lp)
        if num_samples == 0:
            return None
        return self.model.compute_logits(hidden[prepared.logits_indices])

    @torch.inference_mode()
    def sample(self, prepared: PreparedBatch, logits: torch.Tensor | None) -> SamplerOutput:
        """Launch sampling and the token-pool write. A grammar batch's mask must be filled by now."""
        if logits is None:
            return SamplerOutput(torch.empty(0, dtype=torch.int64, device=self.device), None)
        sampling = prepared.sampling
        if prepared.grammar is not None:
            assert prepared.grammar.filled, "sampling a grammar batch before its mask was filled"
            sampling = replace(sampling, token_bitmask=prepared.grammar.device_mask(self.device))
        if sampling.penalties is not None:
            # The history is read on the device, after this batch's own pool writes: the previous
            # batch's sampled ids are in it even if the host has not seen them yet.
            history = self.token_pool.ids[prepared.sample_slots, : sampling.penalties.history.shape[1]]
            sampling = replace(sampling, penalties=replace(sampling.penalties, history=history))
        out = sample_with_logprobs(logits, sampling, self.generator)
        self.token_pool.scatter(prepared.sample_slots, prepared.sample_positions, out.token_ids)
        return out


def check_sampling_params(params: SamplingParams) -> None:
    """Build one row of the sampling tensors on the CPU; raises for parameters the sampler cannot
    take, so the engine can blame one request instead of failing a whole batch."""
    SamplingBatch.build([params.temperature], [params.top_k], [params.top_p], [params.min_p], [params.seed], [0])
    torch.tensor([params.presence_penalty, params.frequency_penalty, params.repetition_penalty], dtype=torch.float32)


PROMPT_LOGITS_ROWS = 256


def _prompt_spans(seqs: tuple[ScheduledSeq, ...]) -> list[tuple[int, int, int]]:
    """Per chunk that covers prompt tokens of a request owed prompt logprobs: the prompt positions
    (1..P-1) its query tokens score, as (seq index, first position, count)."""
    spans = []
    for i, s in enumerate(seqs):
        req = s.request
        if req.params.prompt_logprobs is None:
            continue
        last = min(s.start + s.num_tokens, req.num_prompt_tokens - 1)  # token p scores prompt token p + 1
        if last > s.start:
            spans.append((i, s.start + 1, last - s.start))
    return spans


def _prompt_lp_batch(seqs: tuple[ScheduledSeq, ...], spans: list[tuple[int, int, int]], qsl: np.ndarray,
                     device: torch.device) -> PromptLogprobsBatch | None:
    if not spans:
        return None
    index = np.concatenate([qsl[i] + np.arange(n) for i, _, n in spans])
    targets = np.concatenate([np.asarray(seqs[i].request.prompt_token_ids[first:first + n]) for i, first, n in spans])
    k = max(seqs[i].request.params.prompt_logprobs or 0 for i, _, _ in spans)

    def dev(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a.astype(np.int64))
        return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)

    return PromptLogprobsBatch(spans, dev(index), dev(targets), k)


def _score_prompt(model: DecoderModel, hidden: torch.Tensor, plp: PromptLogprobsBatch) -> None:
    """Raw log-softmax at the scored positions: the prompt token's logprob, rank and the top k."""
    parts = []
    for lo in range(0, plp.token_index.shape[0], PROMPT_LOGITS_ROWS):  # bounds the [rows, V] logits
        index, targets = plp.token_index[lo:lo + PROMPT_LOGITS_ROWS], plp.targets[lo:lo + PROMPT_LOGITS_ROWS]
        raw = torch.log_softmax(model.compute_logits(hidden[index]), dim=-1)
        target = raw.gather(1, targets.unsqueeze(1)).squeeze(1)
        rank = (raw > target.unsqueeze(1)).sum(dim=-1) + 1
        top = raw.topk(plp.k, dim=-1) if plp.k > 0 else None
        empty = raw[:, :0]
        parts.append((target, rank, top.indices if top is not None else empty.long(),
                      top.values if top is not None else empty))
    target, rank, top_ids, top_values = (torch.cat(x) for x in zip(*parts))
    plp.result = (target, rank, top_ids, top_values)


def _grammar_batch(seqs: list[ScheduledSeq], vocab: int, device: torch.device) -> GrammarBatch | None:
    if not any(s.request.grammar is not None for s in seqs):
        return None
    return GrammarBatch(seqs, vocab, pin=device.type == "cuda")


def _bias(seqs: list[ScheduledSeq], device: torch.device, eos_token_ids: tuple[int, ...]) -> Bias | None:
    """logit_bias entries, and -inf on EOS and stop ids for rows still short of min_tokens.

    Whether a row is short is known from lengths (its sample index), never from token values.
    """
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for row, s in enumerate(seqs):
        p = s.request.params
        for tid, v in p.logit_bias.items():
            rows.append(row)
            ids.append(tid)
            values.append(v)
        if s.sample_index < p.min_tokens:
            for tid in (*eos_token_ids, *p.stop_token_ids):
                rows.append(row)
                ids.append(tid)
                values.append(float("-inf"))
    if not rows:
        return None

    def dev(values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)

    return Bias(dev(rows, torch.int64), dev(ids, torch.int64), dev(values, torch.float32))


def _sampling_batch(seqs: list[ScheduledSeq], device: torch.device,
                    eos_token_ids: tuple[int, ...] = ()) -> SamplingBatch:
    params = [s.request.params for s in seqs]
    penalties = None
    if any(p.has_penalties for p in params):
        lengths = [s.kv_len for s in seqs]
        penalties = Penalties(
            presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32).to(device, non_blocking=True),
            frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32).to(device, non_blocking=True),
            repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32).to(device, non_blocking=True),
            history=torch.empty((len(seqs), max(lengths)), dtype=torch.int32),  # shape only; filled at launch
            prompt_lens=torch.tensor([s.request.num_prompt_tokens for s in seqs]).to(device, non_blocking=True),
            lengths=torch.tensor(lengths).to(device, non_blocking=True),
        )
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    bias = _bias(seqs, device, eos_token_ids) if any(p.has_bias for p in params) else None
    batch = SamplingBatch.build(
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
    return replace(batch, bias=bias) if bias is not None else batch
