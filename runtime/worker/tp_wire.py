"""What rank 0 sends the other tensor-parallel ranks through the ring, msgpack-encoded.

A batch travels as what the model runner reads of it: lengths, slots, the pages each sequence
uses this step, pool writes, swaps, freed slots and which chunks score prompt logprobs (numeric
columns as raw int64/int32 bytes). Sampling parameters and grammar state stay on rank 0, which
samples (runtime/worker/tp_runner.py). ``decode_batch`` rebuilds a ``ScheduledBatch`` whose
requests are stand-ins carrying only what the runner reads, so each rank prepares with the same code.
"""

from __future__ import annotations

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
    n = len(seqs)
    cols = np.empty((n, 5), dtype=np.int64)
    counts = np.empty(n, dtype=np.int64)
    pages: list[int] = []
    plp = []
    for i, s in enumerate(seqs):
        k = -(-(s.start + s.num_tokens) // page_size)
        cols[i] = (s.slot, s.start, s.num_tokens, s.samples, s.sample_index)
        counts[i] = k
        pages.extend(s.pages[:k])
        if s.request.params.prompt_logprobs is not None:
            plp.append((i, s.request.params.prompt_logprobs, s.request.num_prompt_tokens))
    return encode(BatchMsg(
        step_id=batch.step_id, num_decodes=batch.num_decodes, seqs=cols.tobytes(), page_counts=counts.tobytes(),
        pages=_ids(pages), writes=[(w.slot, w.start, _ids(w.token_ids)) for w in batch.pool_writes],
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
    seqs = tuple(
        ScheduledSeq(requests[i], slot=int(c[0]), start=int(c[1]), num_tokens=int(c[2]), samples=bool(c[3]),
                     pages=pages[bounds[i]:bounds[i + 1]], sample_index=int(c[4]), epoch=0)  # type: ignore[arg-type]
        for i, c in enumerate(cols.tolist())
    )
    writes = tuple(PoolWrite(slot, start, np.frombuffer(ids, dtype=np.int32).tolist()) for slot, start, ids in msg.writes)
    return ScheduledBatch(msg.step_id, seqs, msg.num_decodes, writes, (), decode_swaps(msg.swaps),
                          tuple(msg.freed_slots))
