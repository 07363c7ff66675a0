"""Accounting: what each step ran and where its time went, and the engine's counters since start.

Times are host-clock seconds (``time.perf_counter``); device intervals come from CUDA events
anchored to that clock (or the CPU executor's worker thread), so one timeline holds both lanes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import NamedTuple

from conveyor.runtime.disagg.stats import TransferStats
from conveyor.scheduler import ScheduledBatch, Scheduler


class DeviceTime:
    """Device busy time, and the idle gaps between batches while work was queued (the pipeline's fault)."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.idle_s = 0.0
        self._last_end = 0.0

    def add(self, start: float, end: float, counts_idle: bool) -> float:
        """One batch ran on the device from ``start`` to ``end``; the idle gap before it, if it counts."""
        idle = max(0.0, start - self._last_end) if self._last_end and counts_idle else 0.0
        self.busy_s += end - start
        self.idle_s += idle
        self._last_end = end
        return idle


class EngineStats(NamedTuple):
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV pages owned by requests
    num_preemptions: int  # since start
    device_busy_s: float  # since start: the device (or CPU worker) ran batches
    device_idle_s: float  # since start: idle between two batches while work was queued
    policy_metrics: dict[str, float]  # the scheduling policy's own numbers (e.g. predictor tau)
    num_retractions: int  # preemptions because the KV pool ran dry
    reservation_beta: float  # share of max_tokens promised at admission now
    kv_pages_total: int
    kv_pages_used: int  # held by requests (private) or locked by them in the prefix cache
    kv_pages_promised: int  # used + promised at admission but not grown into yet
    kv_pages_cached: int  # owned by the prefix cache (locked or evictable)
    prefill_tokens: int  # prompt/recompute tokens computed since start
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache since start
    num_swapped_out: int  # retracted requests whose KV went to host memory
    num_swapped_in: int
    kv_page_states: dict[str, int]  # pages by state: free, private, cached, sending, receiving, quarantined
    transfers: TransferStats | None  # disaggregated roles: KV transfers by result, bytes, seconds

    @classmethod
    def of(cls, sched: Scheduler, device: DeviceTime, transfers: TransferStats | None = None) -> "EngineStats":
        """A snapshot; other threads read it without locking, so counters may be one step old."""
        kv = sched.kv
        used = kv.total_pages - kv.num_available_pages  # read once: the engine thread may move it
        return cls(
            num_running=len(sched.running),
            num_waiting=sched.num_waiting,
            kv_usage=kv.usage,
            num_preemptions=sched.num_preemptions,
            device_busy_s=device.busy_s,
            device_idle_s=device.idle_s,
            policy_metrics=sched.policy.metrics(),
            num_retractions=sched.num_retractions,
            reservation_beta=kv.reservation.beta,
            kv_pages_total=kv.total_pages,
            kv_pages_used=used,
            kv_pages_promised=used + kv.num_outstanding_pages,
            kv_pages_cached=kv.num_cached_pages,
            prefill_tokens=sched.num_prefill_tokens,
            prefix_hit_tokens=sched.num_prefix_hit_tokens,
            num_swapped_out=sched.num_swapped_out,
            num_swapped_in=sched.num_swapped_in,
            kv_page_states=kv.page_counts(),
            transfers=transfers,
        )

    @property
    def prefix_cache_hit_rate(self) -> float:
        total = self.prefill_tokens + self.prefix_hit_tokens
        return self.prefix_hit_tokens / total if total else 0.0

    @property
    def device_idle_fraction(self) -> float:
        total = self.device_busy_s + self.device_idle_s
        return self.device_idle_s / total if total else 0.0


class StepRecord(NamedTuple):
    step_id: int
    num_seqs: int
    num_tokens: int  # query tokens (prefill chunks + decodes)
    num_prefill_tokens: int
    kv_tokens_read: int  # sum of KV lengths attended over: the KV bytes a step must read
    schedule: tuple[float, float]  # producer: policy + batch building + admission
    prepare: tuple[float, float]  # producer: host tensors, staging, H2D copies, attention plan
    launch: tuple[float, float]  # consumer: kernel launches (graph replay)
    wait: tuple[float, float]  # the host blocked on this batch's read-back
    process: tuple[float, float]  # output stage: append, stops, detokenize, stream
    device: tuple[float, float]  # the device (or CPU worker) ran this batch
    device_idle_before: float  # seconds the device sat idle between the previous batch and this one

    @classmethod
    def of(cls, batch: ScheduledBatch, **times: tuple[float, float] | float) -> "StepRecord":
        return cls(
            step_id=batch.step_id,
            num_seqs=len(batch.seqs),
            num_tokens=batch.num_tokens,
            num_prefill_tokens=batch.num_prefill_tokens,
            kv_tokens_read=sum(s.kv_len for s in batch.seqs),
            **times,  # type: ignore[arg-type]
        )

    @staticmethod
    def ms(span: tuple[float, float]) -> float:
        return (span[1] - span[0]) * 1000.0

    @property
    def cpu_ms(self) -> float:
        return sum(self.ms(s) for s in (self.schedule, self.prepare, self.launch, self.process))


class OverlapSummary(NamedTuple):
    steps: int
    device_busy_s: float
    device_idle_s: float
    mean_cpu_ms: float  # schedule + prepare + launch + process per step
    mean_device_ms: float

    @property
    def idle_fraction(self) -> float:
        total = self.device_busy_s + self.device_idle_s
        return self.device_idle_s / total if total else 0.0

    @classmethod
    def of(cls, records: list[StepRecord]) -> "OverlapSummary":
        if not records:
            return cls(0, 0.0, 0.0, float("nan"), float("nan"))
        busy = sum(r.device[1] - r.device[0] for r in records)
        # The first batch's idle gap is start-up, not pipeline: leave it out.
        idle = sum(r.device_idle_before for r in records[1:])
        return cls(len(records), busy, idle, statistics.fmean(r.cpu_ms for r in records),
                   statistics.fmean(StepRecord.ms(r.device) for r in records))


def write_chrome_trace(records: list[StepRecord], path: Path, device_label: str) -> None:
    """A Chrome/Perfetto trace: one lane per host stage and one for the device."""
    if not records:
        path.write_text("[]")
        return
    t0 = min(r.schedule[0] for r in records)
    lanes = {"producer: schedule": 1, "producer: prepare": 1, "consumer: launch": 2, "output: wait": 3,
             "output: process": 3, device_label: 4}
    names = {1: "producer", 2: "consumer", 3: "output", 4: device_label}
    events: list[dict] = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": n}}
                          for tid, n in names.items()]
    for r in records:
        spans = {"producer: schedule": r.schedule, "producer: prepare": r.prepare, "consumer: launch": r.launch,
                 "output: wait": r.wait, "output: process": r.process, device_label: r.device}
        for name, (a, b) in spans.items():
            events.append({
                "ph": "X", "pid": 1, "tid": lanes[name], "name": f"{name.split(': ')[-1]} #{r.step_id}",
                "ts": (a - t0) * 1e6, "dur": max(b - a, 0.0) * 1e6,
                "args": {"seqs": r.num_seqs, "tokens": r.num_tokens, "prefill_tokens": r.num_prefill_tokens},
            })
    path.write_text(json.dumps(events))
