"""The consumer stage: launches prepared batches and hands back their sampled ids.

Two executors, one contract. ``launch`` returns at once with the batch in flight; ``wait`` blocks
until that batch's sampled ids are on the host. Batches run in launch order (one CUDA stream, or
one worker thread), and that order is the only synchronisation between batch N writing the token
pool and batch N+1 reading it.

A batch with grammar-constrained rows (``prepared.grammar``) samples only once the engine has
filled its mask; its forward does not wait. On CPU the worker waits for the mask between forward
and sampling; on CUDA the sampling is enqueued when ``mask_ready`` is called, and any batch
launched meanwhile is held back so stream order stays launch order.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from model.sampling import Logprobs, SamplerOutput
from runtime.model_runner import ModelRunner, PreparedBatch


class BatchResult(NamedTuple):
    token_ids: list[int]
    logprobs: tuple[list[float], list[list[int]], list[list[float]]] | None  # sampled, top ids, top values
    device_start: float  # host-clock seconds when the device started the batch
    device_end: float  # ... and finished it
    # prompt_logprobs rows (PromptLogprobsBatch.spans order): logprob, rank, top ids, top values
    prompt_logprobs: tuple[list[float], list[int], list[list[int]], list[list[float]]] | None = None


class Launched(NamedTuple):
    prepared: PreparedBatch  # keeps every tensor the in-flight batch reads alive
    handle: Any  # executor-specific


def _host_prompt_logprobs(prepared: PreparedBatch) -> tuple | None:
    plp = prepared.prompt_lp
    if plp is None or plp.result is None:
        return None
    return tuple(t.tolist() for t in plp.result)


def _host_logprobs(lp: Logprobs | None) -> tuple[list[float], list[list[int]], list[list[float]]] | None:
    if lp is None:
        return None
    return lp.sampled.tolist(), lp.top_ids.tolist(), lp.top_values.tolist()


class CpuExecutor:
    """One worker thread runs the forward (torch releases the GIL in its kernels), so the engine
    thread schedules and prepares batch N+1 while batch N computes: the same pipeline as on a GPU."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
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

    def mask_ready(self) -> None:
        pass  # the worker waits on the mask's event itself

    def wait(self, launched: Launched) -> BatchResult:
        future: Future[BatchResult] = launched.handle
        return future.result()

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


class CudaExecutor:
    """Kernels go on the current stream; the sampled ids come back through a pinned buffer and an event."""

    def __init__(self, runner: ModelRunner, device: torch.device, max_batch: int, depth: int) -> None:
        self.runner = runner
        self.device = device
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

    def launch(self, prepared: PreparedBatch) -> Launched:
        h = _CudaHandle(prepared)
        if not self._pending:
            self._forward(h)
        self._pending.append(h)
        self._pump()
        return Launched(prepared, h)

    def _forward(self, h: _CudaHandle) -> None:
        h.start = torch.cuda.Event(enable_timing=True)
        h.start.record()
        h.logits = self.runner.forward(h.prepared)

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

    def mask_ready(self) -> None:
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

    def close(self) -> None:
        pass
