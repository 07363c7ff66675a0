"""Host memory for swapped-out KV: the scheduler's side (a page budget and handles), no torch.

The bytes live with the executor (``memory.kv_swapper.KVSwapper``); the scheduler only decides
who may swap, and tells the executor through ``SwapOp``s that run, in launch order, before the
next batch's forward. Ordering is what keeps it safe: a swap-out runs after every batch that
wrote the pages (they were launched earlier) and before any batch of the pages' next owner.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass


class SwapKind(enum.Enum):
    OUT = "out"  # device pages -> host buffer ``handle``
    IN = "in"  # host buffer ``handle`` -> device pages; the buffer is released
    DROP = "drop"  # the request left while swapped out: release the buffer


@dataclass(frozen=True)
class SwapOp:
    kind: SwapKind
    handle: int
    pages: tuple[int, ...] = ()


class SwapSpace:
    def __init__(self, capacity_pages: int) -> None:
        self.capacity_pages = capacity_pages
        self.num_used_pages = 0
        self._held: dict[int, int] = {}
        self._handles = itertools.count()

    def reserve(self, num_pages: int) -> int | None:
        """A handle for ``num_pages`` pages of host memory, or None when it is full (recompute then)."""
        if num_pages <= 0 or self.num_used_pages + num_pages > self.capacity_pages:
            return None
        handle = next(self._handles)
        self._held[handle] = num_pages
        self.num_used_pages += num_pages
        return handle

    def release(self, handle: int) -> None:
        self.num_used_pages -= self._held.pop(handle)

    def check(self) -> None:
        if sum(self._held.values()) != self.num_used_pages or self.num_used_pages > self.capacity_pages:
            raise AssertionError("swap space accounting drifted")
