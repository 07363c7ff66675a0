"""What one engine step runs. Built fresh every step and never mutated once launched."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.memory.swap_space import SwapOp
from conveyor.scheduler.request import Request


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    slot: int
    start: int  # position of the first token computed this step
    num_tokens: int  # query tokens this step (1 for a decode)
    samples: bool  # the chunk reaches the last known token, so a new token is sampled after it
    pages: tuple[int, ...]  # the request's page table as of this step
    sample_index: int  # index of the output token being sampled (seeds derive from it)
    epoch: int  # request.num_preemptions at launch: a sample from an older epoch is dropped

    @property
    def kv_len(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class PoolWrite:
    """Host token ids the token pool must hold before the batch runs (admission, recompute)."""

    slot: int
    start: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ScheduledBatch:
    step_id: int
    seqs: tuple[ScheduledSeq, ...]  # decodes (one query token) first, then prefill chunks
    num_decodes: int
    pool_writes: tuple[PoolWrite, ...]
    preempted: tuple[Request, ...]
    swaps: tuple[SwapOp, ...] = ()  # KV moves to run, in order, before this batch's forward
    freed_slots: tuple[int, ...] = ()  # token-pool slots given back since the previous batch

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs[self.num_decodes :])
