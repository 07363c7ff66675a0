"""Per-step accounting: what each step ran and where its time went (host clocks, milliseconds)."""

from __future__ import annotations

from typing import NamedTuple

from scheduler import ScheduledBatch


class StepRecord(NamedTuple):
    step_id: int
    num_seqs: int
    num_tokens: int  # query tokens (prefill chunks + decodes)
    num_prefill_tokens: int
    kv_tokens_read: int  # sum of KV lengths attended over: the KV bytes a step must read
    schedule_ms: float
    prepare_ms: float
    launch_ms: float
    wait_ms: float  # host blocked reading back the sampled ids
    process_ms: float

    @classmethod
    def of(cls, batch: ScheduledBatch, schedule_ms: float, prepare_ms: float, launch_ms: float, wait_ms: float,
           process_ms: float) -> "StepRecord":
        return cls(
            step_id=batch.step_id,
            num_seqs=len(batch.seqs),
            num_tokens=batch.num_tokens,
            num_prefill_tokens=batch.num_prefill_tokens,
            kv_tokens_read=sum(s.kv_len for s in batch.seqs),
            schedule_ms=schedule_ms,
            prepare_ms=prepare_ms,
            launch_ms=launch_ms,
            wait_ms=wait_ms,
            process_ms=process_ms,
        )
