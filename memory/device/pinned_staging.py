"""Host -> device staging for a batch's int32 metadata: one pinned buffer per pipeline slot.

Every array a batch needs on the device (slots, positions, KV slots, page lists, sampling rows)
goes into fixed regions of a pinned host buffer and is copied into the same regions of one device
buffer. Fixed regions are what lets CUDA graphs use these device views as their static inputs.

Safety, in two parts:
- host side: a pinned buffer is read by the DMA engine *after* ``copy_`` returns, so buffer i is
  rewritten only once the event recorded after its copies has fired (a ring of depth + 1 buffers,
  so the wait is almost never real);
- device side: the copies run on the compute stream, after every kernel of the batches launched
  before, so overwriting the device regions never races a batch still reading them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

MERGE_GAP = 4096  # elements (16 KiB)


def merge_spans(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """[lo, hi) spans, sorted and joined where less than ``gap`` apart."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


class PinnedStaging:
    def __init__(self, regions: Mapping[str, int], num_buffers: int, device: torch.device) -> None:
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, size in regions.items():
            self.offsets[name] = (total, size)
            total += size
        self.device = device
        self.on_cpu = device.type == "cpu"
        self._host = [torch.zeros(total, dtype=torch.int32, pin_memory=not self.on_cpu) for _ in range(num_buffers)]
        self._events: list[torch.cuda.Event | None] = [None] * num_buffers
        self._next = 0
        self.dev = self._host[0] if self.on_cpu else torch.zeros(total, dtype=torch.int32, device=device)

    def region(self, name: str, length: int | None = None) -> torch.Tensor:
        """A device view of a region (a graph's static input when taken once at capture)."""
        start, size = self.offsets[name]
        return self.dev[start : start + (size if length is None else length)]

    def stage(self, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Copy arrays into their regions; returns device views of exactly the staged lengths.

        Written spans less than ``MERGE_GAP`` elements apart go in one copy: a copy costs the host
        ~5-10 us to issue, while a few KiB more on the bus cost the device well under a microsecond.
        """
        for name, a in arrays.items():
            if a.shape[0] > self.offsets[name][1]:
                raise ValueError(f"staging region {name!r} holds {self.offsets[name][1]}, batch needs {a.shape[0]}")
        if self.on_cpu:
            # No device to copy to: fresh tensors per batch, so a batch in flight on the CPU worker
            # never sees the next batch's metadata.
            return {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)) for name, a in arrays.items()}
        i = self._next
        self._next = (i + 1) % len(self._host)
        if (ev := self._events[i]) is not None:
            ev.synchronize()
        host = self._host[i]
        host_np = host.numpy()
        out: dict[str, torch.Tensor] = {}
        spans: list[tuple[int, int]] = []
        for name, a in arrays.items():
            start, n = self.offsets[name][0], a.shape[0]
            host_np[start : start + n] = a
            out[name] = self.dev[start : start + n]
            if n:
                spans.append((start, start + n))
        for lo, hi in merge_spans(spans, MERGE_GAP):
            self.dev[lo:hi].copy_(host[lo:hi], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[i] = ev
        return out
