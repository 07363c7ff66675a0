"""The executors that run a worker's model: one CUDA stream, or one CPU worker thread.

Both keep the contract of ``runtime.engine.executor.Executor``: ``launch`` returns at once with the
batch in flight, ``wait`` blocks until its sampled ids are on the host, batches run in launch order.

A batch with grammar-constrained rows (``prepared.grammar``) samples only once the engine has
filled its mask; its forward does not wait. On CPU the worker waits for the mask between forward
and sampling; on CUDA the sampling is enqueued when ``mask_ready`` is called, and any batch
launched meanwhile is held back so stream order stays launch order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from conveyor.memory import SwapOp
from conveyor.model.sampling import Logprobs, SamplerOutput
from conveyor.runtime.engine.executor import BatchResult, PromptLogprobRows
from conveyor.runtime.worker.model_runner import PreparedBatch, check_sampling_params
from conveyor.runtime.worker.worker import Worker
from conveyor.scheduler import SamplingParams, ScheduledBatch


class Launched(NamedTuple):
    prepared: PreparedBatch  # keeps every tensor the in-flight batch reads alive
    handle: Any  # executor-specific


def _host_prompt_logprobs(prepared: PreparedBatch) -> PromptLogprobRows | None:
    plp = prepared.prompt_lp
    if plp is None or plp.result is None:
        return None
    return PromptLogprobRows(plp.spans, *(t.tolist() for t in plp.result))


def _host_logprobs(lp: Logprobs | None) -> tuple[list[float], list[list[int]], list[list[float]]] | None:
    if lp is None:
        return None
    return lp.sampled.tolist(), lp.top_ids.tolist(), lp.top_values.tolist()


class _WorkerExecutor:
    """What both executors do the same way: staging on the host, swaps, the worker's KV layout."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.runner = worker.runner
        self.kv_layout = worker.kv_layout
        self.kv_region = worker.kv_region

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        return self.runner.prepare(batch)

    def run_swaps(self, ops: tuple[SwapOp, ...]) -> None:
        assert self.runner.swapper is not None, "a swap was scheduled without a swapper"
        self.runner.swapper.run(ops)

    def drop_swapped(self) -> None:
        if self.runner.swapper is not None:
            self.runner.swapper.host.clear()

    def check_sampling_params(self, params: SamplingParams) -> None:
        check_sampling_params(params)

    def fill_grammar_mask(self, launched: Launched) -> float | None:
        grammar = launched.prepared.grammar
        if grammar is None or grammar.filled:
            return None
        grammar.fill()
        self._mask_ready()
        return grammar.fill_s

    def _mask_ready(self) -> None:
        pass  # the CPU worker waits on the mask's event itself


class CpuExecutor(_WorkerExecutor):
    """One worker thread runs the forward (torch releases the GIL in its kernels), so the engine
    thread schedules and prepares batch N+1 while batch N computes: the same pipeline as on a GPU."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-consumer")

    def launch(self, prepared: PreparedBatch) -> Launched:
        return Launched(prepared, self._worker.submit(self._run, prepared))

    def _run(self, prepared: PreparedBatch) -> BatchResult:
        start = time.perf_counter()
        logits = self.runner.forward(prepared)
        if prepared.grammar is not None:
            prepared.grammar.wait()  # the engine thread fills it once the previous batch is processed
        out: SamplerOutput = self.runner.sample(prepared, logits)
        ids = out.token_ids.tolist()
        return BatchResult(ids, _host_logprobs(out.logprobs), start, time.perf_counter(),
                           _host_prompt_logprobs(prepared))

    def wait(self, launched: Launched) -> BatchResult:
        future: Future[BatchResult] = launched.handle
        return future.result()

    def ready(self, launched: Launched) -> bool:
        """Whether ``wait`` would return (or raise) without blocking."""
        future: Future[BatchResult] = launched.handle
        return future.done()

    def close(self) -> None:
        self._worker.shutdown(wait=True)


class _CudaHandle:
    """Filled in two halves when sampling is deferred: forward (start, logits), then the rest."""

    def __init__(self, prepared: PreparedBatch) -> None:
        self.prepared = prepared
        self.start: torch.cuda.Event | None = None
        self.logits: torch.Tensor | None = None
        self.out: SamplerOutput | None = None
        self.host_ids: torch.Tensor | None = None  # pinned; filled by the D2H copy
        self.end: torch.cuda.Event | None = None


class _SyncDebug:
    """torch.cuda.set_sync_debug_mode("error") for the launch path: any hidden host sync raises."""

    def __enter__(self) -> None:
        self._old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode(self._old)


class CudaExecutor(_WorkerExecutor):
    """Kernels go on the current stream; the sampled ids come back through a pinned buffer and an event.

    ``CONVEYOR_DEBUG_SYNC=1`` runs ``prepare`` and ``launch`` under torch's sync-debug mode.
    """

    def __init__(self, worker: Worker, max_batch: int, depth: int) -> None:
        super().__init__(worker)
        self._debug = _SyncDebug if os.environ.get("CONVEYOR_DEBUG_SYNC") == "1" else contextlib.nullcontext
        # depth + 1 pinned read-back buffers, round robin: buffer i is rewritten only by the batch
        # launched depth + 1 batches later, by which time batch i has been waited for.
        self._host_ids = [torch.empty(max_batch, dtype=torch.int64, pin_memory=True) for _ in range(depth + 1)]
        self._next = 0
        self._pending: deque[_CudaHandle] = deque()  # launched, sampling not enqueued yet
        # Anchor device time to host time once, so device intervals can be drawn on the host clock.
        self._anchor = torch.cuda.Event(enable_timing=True)
        self._anchor.record()
        self._anchor.synchronize()
        self._anchor_host = time.perf_counter()

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        # The staging has one device buffer, rewritten (in stream order) by every prepare: a held
        # batch whose forward is not enqueued yet would read this batch's inputs.
        assert all(h.start is not None for h in self._pending), "prepare while a held forward is not enqueued"
        with self._debug():
            return self.runner.prepare(batch)

    def launch(self, prepared: PreparedBatch) -> Launched:
        with self._debug():
            return self._launch(prepared)

    def _launch(self, prepared: PreparedBatch) -> Launched:
        h = _CudaHandle(prepared)
        if not self._pending:
            self._forward(h)
        self._pending.append(h)
        self._pump()
        return Launched(prepared, h)

    def _forward(self, h: _CudaHandle) -> None:
        self.runner.plan(h.prepared)
        # After the plan: its host time is not the device's, even when the device waits for it.
        h.start = torch.cuda.Event(enable_timing=True)
        h.start.record()
        h.logits = self.runner.launch_forward(h.prepared)
        if h.prepared.grammar is not None and not h.prepared.grammar.filled:
            # Its sampling waits for the mask, likely past the next prepare, which rewrites the shared
            # device staging: keep its own copy of the indices the sampler reads from there.
            h.prepared = dataclasses.replace(h.prepared, sample_slots=h.prepared.sample_slots.clone(),
                                             sample_positions=h.prepared.sample_positions.clone())

    def _pump(self) -> None:
        """Enqueue held batches in launch order, up to the first whose mask is not filled yet.

        That batch's forward is already enqueued (it needs no mask); batches after it are not,
        since they read token-pool entries its sampling writes.
        """
        while self._pending:
            h = self._pending[0]
            if h.start is None:
                self._forward(h)
            if h.prepared.grammar is not None and not h.prepared.grammar.filled:
                return
            self._pending.popleft()
            h.out = self.runner.sample(h.prepared, h.logits)
            h.logits = None
            n = h.out.token_ids.shape[0]
            h.host_ids = self._host_ids[self._next][:n]
            self._next = (self._next + 1) % len(self._host_ids)
            h.host_ids.copy_(h.out.token_ids, non_blocking=True)
            h.end = torch.cuda.Event(enable_timing=True)
            h.end.record()

    def _mask_ready(self) -> None:
        with self._debug():  # the held sampling kernels go on the stream now: launch-path work
            self._pump()

    def wait(self, launched: Launched) -> BatchResult:
        h: _CudaHandle = launched.handle
        self._pump()
        if h.end is None:
            raise RuntimeError("waited for a grammar batch whose mask was never filled")
        assert h.out is not None and h.host_ids is not None and h.start is not None
        h.end.synchronize()
        t0 = self._anchor_host + self._anchor.elapsed_time(h.start) / 1000.0
        t1 = self._anchor_host + self._anchor.elapsed_time(h.end) / 1000.0
        return BatchResult(h.host_ids.tolist(), _host_logprobs(h.out.logprobs), t0, t1,
                           _host_prompt_logprobs(h.prepared))

    def ready(self, launched: Launched) -> bool:
        """Whether ``wait`` would return (or raise) without blocking."""
        h: _CudaHandle = launched.handle
        self._pump()
        return h.end is None or h.end.query()

    def close(self) -> None:
        pass


def make_executor(worker: Worker) -> CpuExecutor | CudaExecutor:
    if worker.device.type == "cuda":
        return CudaExecutor(worker, worker.config.max_num_seqs, worker.config.pipeline_depth)
    return CpuExecutor(worker)
