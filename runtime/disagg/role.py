"""What the engine core sees of a disaggregated worker's half: one protocol, so the core never asks
which role it runs. ``PrefillPusher`` (runtime/disagg/prefill.py) and ``DecodeReceiver``
(runtime/disagg/decode.py) implement it; every call comes from the engine thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from conveyor.runtime.disagg.stats import TransferStats
from conveyor.runtime.engine.outputs import RequestOutput, SampleLogprobs
from conveyor.scheduler import Request, ScheduledBatch

Fail = Callable[[Request, str], list[RequestOutput]]  # end a request with an error
Arrived = Callable[[Request, int, SampleLogprobs | None], list[RequestOutput]]  # its KV and first token are in


class DisaggRole(Protocol):
    stats: TransferStats

    def check(self, req: Request) -> None:
        """Raise ``ValueError`` for a request this role cannot serve (built by hand for the other role)."""

    def add(self, req: Request) -> None:
        """A request the scheduler took."""

    def after_launch(self) -> None:
        """A step scheduled (whether or not it launched): tell peers about what it admitted."""

    def after_batch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        """A batch was read back and processed: its KV is written."""

    def poll(self, arrived: Arrived, fail: Fail) -> list[RequestOutput]:
        """Notices, side-channel events and deadlines, at the top of every step."""

    def busy(self) -> bool:
        """Rooms are open: the engine has work even with nothing scheduled."""

    def close(self) -> None:
        """Before the KV pool goes: nothing may still be written into it."""
