"""Requests and their states, scheduling policies, batch building, admission and preemption."""

from scheduler.batch import PoolWrite, ScheduledBatch, ScheduledSeq
from scheduler.errors import InvalidRequestError
from scheduler.params import SamplingParams, StructuredSpec
from scheduler.policy import FCFSPolicy, SchedulingPolicy, make_policy
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerLimits

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
