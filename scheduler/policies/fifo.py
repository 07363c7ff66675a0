"""FIFO without batching: one request at a time, to completion (the unbatched baseline)."""

from __future__ import annotations

from conveyor.scheduler.policies.fcfs import FCFSPolicy
from conveyor.scheduler.request import Request


class FIFOPolicy(FCFSPolicy):
    """Arrival order, and nothing is admitted while the admitted request is still alive.

    "Alive" ends at ``on_finish`` (stop, length or abort) or at preemption (``requeue``): a
    preempted request goes back to the front, so it is the next one admitted anyway.
    """

    name = "fifo"

    def __init__(self) -> None:
        super().__init__()
        self._active: Request | None = None

    def peek(self) -> Request | None:
        return None if self._active is not None else super().peek()

    def pop(self) -> Request:
        self._active = super().pop()
        return self._active

    def requeue(self, request: Request) -> None:
        if request is self._active:
            self._active = None
        super().requeue(request)

    def on_finish(self, request: Request) -> None:
        if request is self._active:
            self._active = None
