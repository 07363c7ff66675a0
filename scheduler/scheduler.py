"""Iteration-level continuous batching: every step, pick decodes and prefill chunks under a token
budget and a sequence cap, find them pages, and preempt (recompute) when the pool runs dry.

Ownership of slots and pages is decided here: a request gets a token-pool slot and its first
pages at admission and grows pages as it advances. It gives both back
- at finish (stop, length, abort): only once no launched batch holding it is still unprocessed
  (``batch_done``), so a batch in flight never reads a page or slot that has a new owner;
- at preemption (the pool ran dry, or the policy gave its slot to a more urgent waiter): at
  once, because memory or the slot is needed now. That is safe because every device
  access to pages, slots and the token pool is a kernel on the one compute stream (or, on the
  CPU, the one executor thread), and the new owner's accesses come from batches launched later.
  The preempted request's in-flight samples are dropped by epoch.
The scheduler never reads a sampled token's value: lengths are enough.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from memory import IndexAllocator, KVCacheManager
from scheduler.batch import PoolWrite, ScheduledBatch, ScheduledSeq
from scheduler.policy import SchedulerLoad, SchedulingPolicy
from scheduler.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, limits: SchedulerLimits, policy: SchedulingPolicy, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.policy = policy
        self.kv = kv
        self.slots = IndexAllocator(limits.max_num_seqs)
        self.running: list[Request] = []
        self.draining: list[Request] = []  # finished, waiting for in-flight batches before release
        self.requests: dict[str, Request] = {}
        self._step_ids = itertools.count()
        self.num_preemptions = 0

    # -- intake ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.policy.add(request)

    def has_work(self) -> bool:
        return bool(self.running) or self.policy.num_waiting() > 0

    @property
    def num_waiting(self) -> int:
        return self.policy.num_waiting()

    # -- the step -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Build the next batch and advance its requests' lengths as if it were already launched."""
        self.policy.observe(SchedulerLoad(self.clock(), self.policy.num_waiting(), len(self.running),
                                          self.kv.usage, self.slots.num_free))
        budget = self.limits.max_num_batched_tokens
        picked: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        writes: list[PoolWrite] = []

        # Policy-driven preemption (priority, srtf): when every slot is taken, the policy may name
        # running requests to give up their slots to more urgent waiting ones. It happens before
        # the budget is handed out, so a request is never both in this batch and preempted. FCFS
        # names none. These preemptions do not block admission below: freeing slots for
        # admission is their whole point, and memory was not short.
        evicted: list[Request] = []
        if self.slots.num_free == 0 and self.policy.num_waiting() > 0:
            for victim in self.policy.preempt_for_waiting(list(self.running)):
                if victim.status is RequestStatus.RUNNING:
                    self._preempt(victim)
                    evicted.append(victim)

        for req in self.policy.order_running(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self._tokens_to_run(req, budget)
            if n == 0:
                continue
            while not self.kv.grow(req.request_id, req.num_computed_tokens + n):
                others = [r for r in self.running if r is not req and all(r is not p for p, _ in picked)]
                victim = self.policy.victim(others) if others else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                picked.append((req, n))
                budget -= n

        # No admissions in a step that had to preempt: memory is short already.
        # Slots, not len(running), bound admission: a finished request still draining holds its slot.
        while not preempted and budget > 0 and self.slots.num_free > 0:
            req = self.policy.peek()
            if req is None or not self.kv.can_admit(req.num_tokens, req.remaining_new_tokens):
                break
            n = self._tokens_to_run(req, budget)
            if n == 0:
                break
            self.policy.pop()
            self._admit(req)
            if not self.kv.grow(req.request_id, n):  # admission promised more than this; cannot fail
                raise AssertionError("admitted request could not get its first pages")
            writes.append(PoolWrite(req.slot, 0, tuple(req.known_token_ids())))
            picked.append((req, n))
            budget -= n

        if not picked:
            return None
        return self._launch(picked, writes, evicted + preempted)

    def _tokens_to_run(self, req: Request, budget: int) -> int:
        pending = req.num_tokens - req.num_computed_tokens
        if pending == 0 or req.remaining_new_tokens <= 0:
            # All its tokens are computed and its last sample is in flight: a length finish,
            # known in advance, so it is left out of the next batch.
            return 0
        if pending > budget and not self.limits.enable_chunked_prefill:
            return 0
        return min(pending, budget)

    def _admit(self, req: Request) -> None:
        req.slot = self.slots.allocate(1)[0]
        self.kv.admit(req.request_id, req.num_tokens, req.remaining_new_tokens)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _launch(
        self, picked: list[tuple[Request, int]], writes: list[PoolWrite], preempted: list[Request]
    ) -> ScheduledBatch:
        seqs: list[ScheduledSeq] = []
        for req, n in picked:
            samples = req.num_computed_tokens + n == req.num_tokens
            seqs.append(
                ScheduledSeq(
                    request=req,
                    slot=req.slot,
                    start=req.num_computed_tokens,
                    num_tokens=n,
                    samples=samples,
                    pages=tuple(self.kv.page_tables[req.request_id]),
                    sample_index=req.num_launched_outputs,
                    epoch=req.num_preemptions,
                )
            )
            req.num_inflight += 1
            req.num_computed_tokens += n
            if samples:
                req.num_tokens += 1
        seqs.sort(key=lambda s: s.num_tokens != 1)  # decodes first; stable keeps policy order
        num_decodes = sum(1 for s in seqs if s.num_tokens == 1)
        return ScheduledBatch(next(self._step_ids), tuple(seqs), num_decodes, tuple(writes), tuple(preempted))

    # -- leaving --------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        """Recompute preemption: drop its KV and slot, keep its tokens, wait again at the front."""
        self._release(req)
        self.running.remove(req)
        # Tokens launched but not yet read back are dropped with the KV; they will be sampled again.
        req.num_tokens = len(req.known_token_ids())
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.policy.requeue(req)

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if req.is_finished:
            raise AssertionError(f"request {req.request_id} finished twice")
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            if req.num_inflight:
                self.draining.append(req)
            else:
                self._release(req)
        else:
            self.policy.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        del self.requests[req.request_id]
        self.policy.on_finish(req)  # predictors learn lengths; fifo/static/fair release their hold

    def batch_done(self, batch: ScheduledBatch) -> None:
        """The batch's outputs are processed: nothing in flight reads its requests through it any more."""
        for seq in batch.seqs:
            seq.request.num_inflight -= 1
        if self.draining:
            done = [r for r in self.draining if r.num_inflight == 0]
            for req in done:
                self.draining.remove(req)
                self._release(req)

    def _release(self, req: Request) -> None:
        self.kv.free(req.request_id)
        self.slots.free([req.slot])
        req.slot = None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        self.slots.check()
        holders = self.running + self.draining
        if self.slots.num_in_use != len(holders):
            raise AssertionError(f"{self.slots.num_in_use} slots in use for {len(holders)} requests holding slots")
        if any(not self.kv.holds(r.request_id) for r in holders):
            raise AssertionError("a running request holds no page table")
        if len(self.kv.page_tables) != len(holders):
            raise AssertionError("a page table has no running or draining owner")
