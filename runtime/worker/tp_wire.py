"""What rank 0 sends the other tensor-parallel ranks through the ring, msgpack-encoded.

A batch travels as what the model runner reads of it: lengths, slots, page tables, pool writes,
swaps, freed slots and which chunks score prompt logprobs (numeric columns as raw int64/int32
bytes). Page tables go as deltas: each rank keeps the table it last got per slot, and a sequence
whose table only grew sends its new pages (a decode, most steps: none), otherwise all of them.
Sampling parameters and grammar state stay on rank 0, which samples (runtime/worker/tp_runner.py).
``PageTableReceiver.decode`` rebuilds a ``ScheduledBatch`` whose requests are stand-ins carrying
only what the runner reads, so each rank prepares with the same code.
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
    seqs: bytes  # int64 [n, 7]: slot, start, num_tokens, samples, sample_index, page base, pages sent
    pages: bytes  # int32, concatenated: sequence i's table from its page base on
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


class PageTableSender:
    """Rank 0's record of the page table every other rank holds per slot (what it last sent them)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._sent: dict[int, tuple[int, ...]] = {}

    def encode(self, batch: ScheduledBatch) -> tuple[bytes, dict[int, tuple[int, ...]]]:
        """The batch's message, and the tables it leaves the ranks with: ``commit`` them once it is sent."""
        seqs, ps, sent = batch.seqs, self.page_size, self._sent
        tables: dict[int, tuple[int, ...]] = {}
        rows: list[tuple[int, ...]] = []
        new: list[tuple[int, ...]] = []
        for s in seqs:
            table = s.pages[: -(-(s.start + s.num_tokens) // ps)]  # the pages its KV reaches this step
            if type(table) is not tuple:
                table = tuple(table)
            old = sent.get(s.slot)
            base = len(old) if old is not None and len(old) <= len(table) and table[: len(old)] == old else 0
            rows.append((s.slot, s.start, s.num_tokens, s.samples, s.sample_index, base, len(table) - base))
            if base < len(table):
                new.append(table[base:])
            tables[s.slot] = table
        cols = np.array(rows, dtype=np.int64).reshape(-1, 7)
        pages = np.fromiter(itertools.chain.from_iterable(new), dtype=np.int32)
        plp = [(i, s.request.params.prompt_logprobs, s.request.num_prompt_tokens) for i, s in enumerate(seqs)
               if s.request.params.prompt_logprobs is not None]
        return encode(BatchMsg(
            step_id=batch.step_id, num_decodes=batch.num_decodes, seqs=cols.tobytes(), pages=pages.tobytes(),
            writes=[(w.slot, w.start, _ids(w.token_ids)) for w in batch.pool_writes],
            swaps=encode_swaps(batch.swaps), freed_slots=list(batch.freed_slots), prompt_logprobs=plp,
        )), tables

    def commit(self, tables: dict[int, tuple[int, ...]]) -> None:
        self._sent.update(tables)


# What the runner reads of a request it does not sample for: no prompt logprobs, no grammar, no penalties.
_STAND_IN = Request("tp-stand-in", [], SamplingParams(max_tokens=1), 1)


class PageTableReceiver:
    """A worker rank's page table per slot, kept up to date from rank 0's deltas."""

    def __init__(self) -> None:
        self._tables: dict[int, np.ndarray] = {}

    def decode(self, msg: BatchMsg) -> ScheduledBatch:
        cols = np.frombuffer(msg.seqs, dtype=np.int64).reshape(-1, 7).tolist()
        pages = np.frombuffer(msg.pages, dtype=np.int32)
        requests = [_STAND_IN] * len(cols)
        for i, k, prompt_len in msg.prompt_logprobs:  # targets are never read off this rank: zeros do
            requests[i] = Request(f"tp-plp-{i}", [0] * prompt_len, SamplingParams(max_tokens=1, prompt_logprobs=k), 1)
        tables, at, seqs = self._tables, 0, []
        for i, (slot, start, num_tokens, samples, sample_index, base, count) in enumerate(cols):
            if base == 0:
                table = pages[at:at + count]
            elif count:
                table = np.concatenate((tables[slot][:base], pages[at:at + count]))
            else:
                table = tables[slot]
            at += count
            tables[slot] = table
            seqs.append(ScheduledSeq(requests[i], slot, start, num_tokens, bool(samples), table,  # type: ignore[arg-type]
                                     sample_index, 0))
        writes = tuple(PoolWrite(slot, start, np.frombuffer(ids, dtype=np.int32).tolist())
                       for slot, start, ids in msg.writes)
        return ScheduledBatch(msg.step_id, tuple(seqs), msg.num_decodes, writes, (), decode_swaps(msg.swaps),
                              tuple(msg.freed_slots))
