"""Longest prefix match first: admit the waiting request that finds most of its prompt cached.

Requests that share a document then run close together, while the document's pages are still
cached, instead of one of them evicting what the next one needs (SGLang's ``lpm``). Every
step costs a cache lookup per waiting request, so past ``max_queue`` waiting requests the
order falls back to FCFS, as SGLang does. Preemption victims and running order are FCFS's.
"""

from __future__ import annotations

from collections.abc import Callable

from conveyor.scheduler.policies.fcfs import FCFSPolicy
from conveyor.scheduler.request import Request


class LPMPolicy(FCFSPolicy):
    name = "lpm"
    uses_prefix_len = True

    def __init__(self, max_queue: int = 128) -> None:
        super().__init__()
        self.max_queue = max_queue
        self.prefix_len: Callable[[Request], int] | None = None  # bound by the scheduler when caching is on
        self._next: Request | None = None

    def peek(self) -> Request | None:
        self._next = None
        if self.prefix_len is None or len(self._queue) > self.max_queue or len(self._queue) < 2:
            return super().peek()
        # Longest cached prefix first; arrival order among equals (max keeps the first maximum).
        self._next = max(self._queue, key=self.prefix_len)
        return self._next

    def remove(self, request: Request) -> None:
        super().remove(request)
        if self._next is request:
            self._next = None

    def pop(self) -> Request:
        if self._next is None:
            return super().pop()
        req, self._next = self._next, None
        self._queue.remove(req)
        return req
