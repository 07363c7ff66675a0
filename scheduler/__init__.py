"""Requests and their states, scheduling policies, batch building, admission and preemption."""

from conveyor.scheduler.batch import PoolWrite, ScheduledBatch, ScheduledSeq
from conveyor.scheduler.errors import InvalidRequestError
from conveyor.scheduler.params import SamplingParams, StructuredSpec
from conveyor.scheduler.policies import FCFSPolicy, SchedulingPolicy, make_policy
from conveyor.scheduler.request import FinishReason, Request, RequestStatus
from conveyor.scheduler.scheduler import Scheduler, SchedulerLimits

__all__ = [
    "FCFSPolicy",
    "FinishReason",
    "InvalidRequestError",
    "PoolWrite",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledBatch",
    "ScheduledSeq",
    "Scheduler",
    "StructuredSpec",
    "SchedulerLimits",
    "SchedulingPolicy",
    "make_policy",
]
