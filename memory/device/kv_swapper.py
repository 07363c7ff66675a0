"""Moves a request's KV pages to host memory and back (the executor's side of ``SwapSpace``).

On CUDA the device->host and host->device transfers run on a side stream: a swap-out first
gathers the pages into a device buffer on the compute stream (so the pages are free for their
next owner as soon as the gather is queued), then the side stream copies that buffer into
pinned host memory while the compute stream goes on with the batch. A swap-in copies on the
side stream and the compute stream waits for it before scattering into the new pages.
``record_stream`` keeps each device buffer alive until the stream that reads it is done;
pinned buffers are kept by torch's caching host allocator until their copies complete.
On the CPU both sides are host memory and the copies are plain gathers and scatters.
"""

from __future__ import annotations

import torch

from conveyor.memory.device.kv_pool import KVPool
from conveyor.memory.swap_space import SwapKind, SwapOp


class KVSwapper:
    def __init__(self, kv_pool: KVPool) -> None:
        self.kv = kv_pool.data  # [layers, pages, 2, page_size, kv_heads, head_dim]
        self.device = self.kv.device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host: dict[int, torch.Tensor] = {}

    def run(self, ops: tuple[SwapOp, ...]) -> None:
        for op in ops:
            if op.kind is SwapKind.OUT:
                self._out(op.handle, self._index(op.pages))
            elif op.kind is SwapKind.IN:
                self._in(self.host.pop(op.handle), self._index(op.pages))
            else:
                self.host.pop(op.handle)

    def _index(self, pages: tuple[int, ...]) -> torch.Tensor:
        idx = torch.tensor(pages, dtype=torch.int64)
        return idx if self.stream is None else idx.pin_memory().to(self.device, non_blocking=True)

    def _out(self, handle: int, idx: torch.Tensor) -> None:
        gathered = self.kv[:, idx]  # a copy, on the compute stream
        if self.stream is None:
            self.host[handle] = gathered
            return
        buf = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(gathered, non_blocking=True)
        gathered.record_stream(self.stream)
        self.host[handle] = buf

    def _in(self, buf: torch.Tensor, idx: torch.Tensor) -> None:
        if self.stream is None:
            self.kv[:, idx] = buf
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):  # after this stream's earlier swap-out of the same buffer
            staged = buf.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        compute.wait_event(copied)  # this copy only, not swap-outs queued after it on the side stream
        staged.record_stream(compute)
        self.kv[:, idx] = staged
