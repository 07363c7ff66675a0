"""The policy interface: the order of the waiting queue, the order of running requests, and victims.

The scheduler asks; the policy decides. Policies are pure Python and know nothing of memory.
Each policy has a file beside this one and a line in the registry (``policies/__init__.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar, NamedTuple

from conveyor.scheduler.length_predictor import LengthPredictor
from conveyor.scheduler.request import Request


class SchedulerLoad(NamedTuple):
    """What the scheduler sees of the load at the start of a step; policies may adapt to it."""

    now: float  # the scheduler clock (time.monotonic unless a simulator injects one)
    num_waiting: int
    num_running: int
    kv_usage: float  # fraction of KV pages held by requests, 0-1
    free_slots: int


class SchedulingPolicy(ABC):
    """A policy's queue operations are abstract; the hooks most policies leave alone have defaults.

    Capabilities are declared here, not discovered: the engine keeps ``predictor`` across restarts
    (``--length-predictor-path``) when a policy has one, and the scheduler binds ``prefix_len`` (the
    cached-prefix length of a waiting request) when a policy sets ``uses_prefix_len``.
    """

    name: ClassVar[str]
    predictor: LengthPredictor | None = None  # sjf, srtf and adaptive learn output lengths
    uses_prefix_len: ClassVar[bool] = False

    @abstractmethod
    def add(self, request: Request) -> None:
        """A new arrival joins the waiting queue."""
        ...

    @abstractmethod
    def requeue(self, request: Request) -> None:
        """A preempted request goes back to wait; it has already waited once."""
        ...

    @abstractmethod
    def remove(self, request: Request) -> None: ...

    @abstractmethod
    def peek(self) -> Request | None:
        """The waiting request to admit next (it stays queued until ``pop``)."""
        ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def num_waiting(self) -> int: ...

    @abstractmethod
    def waiting(self) -> Iterable[Request]: ...

    @abstractmethod
    def order_running(self, running: list[Request]) -> list[Request]:
        """Running requests in the order they get the step's token budget."""
        ...

    @abstractmethod
    def victim(self, candidates: list[Request]) -> Request:
        """Which of ``candidates`` to preempt when memory runs out."""
        ...

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        """Running requests to preempt now so more urgent waiting ones get their slots.

        Asked only when every slot is taken and something waits; most policies name none.
        """
        return []

    def on_finish(self, request: Request) -> None:
        """``request`` left for good (stop, length, abort), whether it was running or waiting."""

    def observe(self, load: SchedulerLoad) -> None:
        """Called once per step before anything else; most policies ignore it."""

    def metrics(self) -> dict[str, float]:
        """Numbers worth exporting (e.g. a predictor's Kendall tau), keyed by a metric-name suffix."""
        return {}
