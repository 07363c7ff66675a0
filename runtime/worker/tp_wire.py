"""What rank 0 sends the other tensor-parallel ranks through the ring, msgpack-encoded.

A batch travels as what the model runner reads of it: lengths, slots, the pages each sequence
uses this step, pool writes, swaps, freed slots and which chunks score prompt logprobs (numeric
columns as raw int64/int32 bytes). Sampling parameters and grammar state stay on rank 0, which
samples (runtime/worker/tp_runner.py). ``decode_batch`` rebuilds a ``ScheduledBatch`` whose
requests are stand-ins carrying only what the runner reads, so each rank prepares with the same code.
"""

from __future__ import annotations

import itertools

import msgspec
import numpy as np

from conveyor.memory import SwapOp
from conveyor.memory.swap_space import SwapKind
from conveyor.scheduler import PoolWrite, Request, SamplingParams, ScheduledBatch, ScheduledSeq


class BatchMsg(msgspec.Struct, tag="batch", array_like=True):
    step_id: int
    num_decodes: int
    seqs: bytes  # int64 [n, 5]: slot, start, num_tokens, samples, sample_index
    page_counts: bytes  # int64 [n]: pages sent per sequence (those its KV reaches this step)
    pages: bytes  # int32, concatenated
    writes: list[tuple[int, int, bytes]]  # (slot, start, int32 token ids)
    swaps: list[tuple[str, int, bytes]]  # (kind, handle, int32 pages)
    freed_slots: list[int]
    prompt_logprobs: list[tuple[int, int, int]]  # (seq index, prompt_logprobs, prompt length)


class SwapsMsg(msgspec.Struct, tag="swaps", array_like=True):
    swaps: list[tuple[str, int, bytes]]


class DropSwappedMsg(msgspec.Struct, tag="drop", array_like=True):
    pass


class CloseMsg(msgspec.Struct, tag="close", array_like=True):
    pass


Message = BatchMsg | SwapsMsg | DropSwappedMsg | CloseMsg

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)


def _ids(values: tuple[int, ...] | list[int]) -> bytes:
    return np.asarray(values, dtype=np.int32).tobytes()


def encode_swaps(ops: tuple[SwapOp, ...]) -> list[tuple[str, int, bytes]]:
    return [(op.kind.value, op.handle, _ids(op.pages)) for op in ops]


def decode_swaps(ops: list[tuple[str, int, bytes]]) -> tuple[SwapOp, ...]:
    return tuple(SwapOp(SwapKind(kind), handle, tuple(np.frombuffer(pages, dtype=np.int32).tolist()))
                 for kind, handle, pages in ops)


def encode_batch(batch: ScheduledBatch, page_size: int) -> bytes:
    seqs = batch.seqs
    cols = np.array([(s.slot, s.start, s.num_tokens, s.samples, s.sample_index) for s in seqs],
                    dtype=np.int64).reshape(-1, 5)
    counts = (cols[:, 1] + cols[:, 2] + page_size - 1) // page_size
    pages = np.fromiter(itertools.chain.from_iterable(s.pages[:k] for s, k in zip(seqs, counts.tolist())),
                        dtype=np.int32)
    plp = [(i, s.request.params.prompt_logprobs, s.request.num_prompt_tokens) for i, s in enumerate(seqs)
           if s.request.params.prompt_logprobs is not None]
    return encode(BatchMsg(
        step_id=batch.step_id, num_decodes=batch.num_decodes, seqs=cols.tobytes(), page_counts=counts.tobytes(),
        pages=pages.tobytes(), writes=[(w.slot, w.start, _ids(w.token_ids)) for w in batch.pool_writes],
        swaps=encode_swaps(batch.swaps), freed_slots=list(batch.freed_slots), prompt_logprobs=plp,
    ))


# What the runner reads of a request it does not sample for: no prompt logprobs, no grammar, no penalties.
_STAND_IN = Request("tp-stand-in", [], SamplingParams(max_tokens=1), 1)


def decode_batch(msg: BatchMsg) -> ScheduledBatch:
    cols = np.frombuffer(msg.seqs, dtype=np.int64).reshape(-1, 5)
    counts = np.frombuffer(msg.page_counts, dtype=np.int64)
    pages = np.frombuffer(msg.pages, dtype=np.int32)
    bounds = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    requests = [_STAND_IN] * len(cols)
    for i, k, prompt_len in msg.prompt_logprobs:  # targets are never read off this rank: zeros do
        requests[i] = Request(f"tp-plp-{i}", [0] * prompt_len, SamplingParams(max_tokens=1, prompt_logprobs=k), 1)
    b = bounds.tolist()
    seqs = tuple(
        ScheduledSeq(requests[i], slot, start, num_tokens, bool(samples), pages[b[i]:b[i + 1]],  # type: ignore[arg-type]
                     sample_index, 0)
        for i, (slot, start, num_tokens, samples, sample_index) in enumerate(cols.tolist())
    )
    writes = tuple(PoolWrite(slot, start, np.frombuffer(ids, dtype=np.int32).tolist()) for slot, start, ids in msg.writes)
    return ScheduledBatch(msg.step_id, seqs, msg.num_decodes, writes, (), decode_swaps(msg.swaps),
                          tuple(msg.freed_slots))
