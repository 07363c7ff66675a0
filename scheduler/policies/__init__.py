"""Selectable scheduling policies (``--schedule-policy``), one small file each, pure Python."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from conveyor.scheduler.length_predictor import LengthPredictor
from conveyor.scheduler.policies.adaptive import AdaptivePolicy
from conveyor.scheduler.policies.fair import FairSharePolicy
from conveyor.scheduler.policies.fifo import FIFOPolicy
from conveyor.scheduler.policies.lpm import LPMPolicy
from conveyor.scheduler.policies.priority import PriorityPolicy
from conveyor.scheduler.policies.round_robin import RoundRobinPolicy
from conveyor.scheduler.policies.sjf import SJFPolicy, SRTFPolicy
from conveyor.scheduler.policies.static import StaticBatchPolicy
from conveyor.scheduler.policy import FCFSPolicy, SchedulingPolicy

POLICY_NAMES = ("fcfs", "fifo", "static", "priority", "sjf", "srtf", "fair", "round-robin", "adaptive", "lpm")


def build(name: str, *, priority_aging_s: float = 30.0, static_batch_size: int = 8,
          static_batch_timeout: float = 0.5, round_robin_time_slice: int = 8,
          tenant_weights: Mapping[str, float] | None = None,
          predictor: LengthPredictor | None = None, clock: Callable[[], float] = time.monotonic) -> SchedulingPolicy:
    """The policy called ``name`` with its knobs; ``clock`` is injectable so tests simulate time."""
    if name == "fcfs":
        return FCFSPolicy()
    if name == "fifo":
        return FIFOPolicy()
    if name == "static":
        return StaticBatchPolicy(static_batch_size, static_batch_timeout, clock)
    if name == "priority":
        return PriorityPolicy(priority_aging_s, clock)
    if name == "sjf":
        return SJFPolicy(predictor)  # ages in finished work, not seconds: see sjf.py
    if name == "srtf":
        return SRTFPolicy(predictor)
    if name == "fair":
        return FairSharePolicy(tenant_weights=tenant_weights)
    if name == "round-robin":
        return RoundRobinPolicy(round_robin_time_slice)
    if name == "lpm":
        return LPMPolicy()
    if name == "adaptive":
        return AdaptivePolicy(priority_aging_s, clock)
    raise ValueError(f"unknown schedule policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")


__all__ = [
    "POLICY_NAMES", "AdaptivePolicy", "FIFOPolicy", "FairSharePolicy", "LPMPolicy", "PriorityPolicy",
    "RoundRobinPolicy", "SJFPolicy", "SRTFPolicy", "StaticBatchPolicy", "build",
]
