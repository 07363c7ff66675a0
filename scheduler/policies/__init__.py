"""Selectable scheduling policies (``--schedule-policy``), one small file each, pure Python.

``POLICIES`` is the one registry: the CLI's choices, the simulator's and the tests' lists all come
from it, and ``make_policy`` builds a policy from it with the knobs in ``PolicyOptions``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from conveyor.scheduler.length_predictor import LengthPredictor
from conveyor.scheduler.policies.adaptive import AdaptivePolicy
from conveyor.scheduler.policies.base import SchedulerLoad, SchedulingPolicy
from conveyor.scheduler.policies.fair import FairSharePolicy
from conveyor.scheduler.policies.fcfs import FCFSPolicy
from conveyor.scheduler.policies.fifo import FIFOPolicy
from conveyor.scheduler.policies.lpm import LPMPolicy
from conveyor.scheduler.policies.priority import PriorityPolicy
from conveyor.scheduler.policies.round_robin import RoundRobinPolicy
from conveyor.scheduler.policies.sjf import SJFPolicy, SRTFPolicy
from conveyor.scheduler.policies.static import StaticBatchPolicy


@dataclass(frozen=True)
class PolicyOptions:
    """Every policy's knobs (the engine flags' names); each policy reads the ones it has."""

    priority_aging_s: float = 30.0
    static_batch_size: int = 8
    static_batch_timeout: float = 0.5
    round_robin_time_slice: int = 8
    tenant_weights: Mapping[str, float] | None = None
    predictor: LengthPredictor | None = None  # sjf/srtf: start from this one instead of a fresh predictor
    clock: Callable[[], float] = time.monotonic  # injectable, so tests and the simulator set the time


POLICIES: dict[str, Callable[[PolicyOptions], SchedulingPolicy]] = {
    "fcfs": lambda o: FCFSPolicy(),
    "fifo": lambda o: FIFOPolicy(),
    "static": lambda o: StaticBatchPolicy(o.static_batch_size, o.static_batch_timeout, o.clock),
    "priority": lambda o: PriorityPolicy(o.priority_aging_s, o.clock),
    "sjf": lambda o: SJFPolicy(o.predictor),  # ages in finished work, not seconds: see sjf.py
    "srtf": lambda o: SRTFPolicy(o.predictor),
    "fair": lambda o: FairSharePolicy(tenant_weights=o.tenant_weights),
    "round-robin": lambda o: RoundRobinPolicy(o.round_robin_time_slice),
    "adaptive": lambda o: AdaptivePolicy(o.priority_aging_s, o.clock),
    "lpm": lambda o: LPMPolicy(),
}
POLICY_NAMES = tuple(POLICIES)


def make_policy(name: str, **options: object) -> SchedulingPolicy:
    """The policy called ``name``; ``options`` are ``PolicyOptions`` fields."""
    if name not in POLICIES:
        raise ValueError(f"unknown schedule policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")
    return POLICIES[name](dataclasses.replace(PolicyOptions(), **options))


__all__ = [
    "POLICIES", "POLICY_NAMES", "AdaptivePolicy", "FCFSPolicy", "FIFOPolicy", "FairSharePolicy", "LPMPolicy",
    "PolicyOptions", "PriorityPolicy", "RoundRobinPolicy", "SJFPolicy", "SRTFPolicy", "SchedulerLoad",
    "SchedulingPolicy", "StaticBatchPolicy", "make_policy",
]
