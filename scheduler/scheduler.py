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

With the prefix cache on, admission starts a request after its longest cached prefix, a launched
prefill chunk hands its whole pages to the cache, and a leaving request caches the pages whose
tokens the host knows. With swap preemption, a retracted request's KV moves to host memory and
back through ``SwapOp``s carried by the next batch, which runs them before its forward.

Disaggregation: on a decode worker a request with ``remote_prefill`` is admitted like any other
(slot, pages for its whole prompt, its promise) but into ``awaiting`` instead of a batch: a peer
computes the prompt into those pages. ``kv_arrived`` makes it RUNNING with the peer's first token;
finishing it while it awaits leaves its pages QUARANTINED (the peer may still write) for the
disaggregation layer to free. On a prefill worker a request with ``kv_push`` is never a preemption
victim (the transport may be reading its pages) and, finished, keeps its pages while ``kv_hold``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.memory import IndexAllocator, KVCacheManager, PrefixMatch, SwapKind, SwapOp, SwapSpace, TableState
from conveyor.scheduler.batch import PoolWrite, ScheduledBatch, ScheduledSeq
from conveyor.scheduler.policies.base import SchedulerLoad, SchedulingPolicy
from conveyor.scheduler.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, limits: SchedulerLimits, policy: SchedulingPolicy, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic, swap: SwapSpace | None = None) -> None:
        self.limits = limits
        self.swap = swap  # set: retracted requests' KV goes to host memory instead of being recomputed
        self._swaps: list[SwapOp] = []  # for the next launched batch
        self._freed_slots: list[int] = []  # likewise: the token pool re-poisons them in debug mode
        self.clock = clock
        self.policy = policy
        cache = kv.prefix_cache
        if cache is not None and policy.uses_prefix_len:  # cache-aware policies (lpm) look up prefixes
            # As match_prefix: the last token is never served from the cache.
            policy.prefix_len = lambda r: cache.match_len(r.known_token_ids()[:-1])
        self.kv = kv
        self.slots = IndexAllocator(limits.max_num_seqs)
        self.running: list[Request] = []
        self.draining: list[Request] = []  # finished, waiting for in-flight batches before release
        self.awaiting: dict[str, Request] = {}  # AWAIT_KV: admitted, their KV arriving from a peer
        self.newly_awaiting: list[Request] = []  # admitted into AWAIT_KV since the last take_awaiting()
        self._arrived_writes: list[tuple[Request, PoolWrite]] = []  # token-pool writes for kv_arrived ones
        self.requests: dict[str, Request] = {}
        self._step_ids = itertools.count()
        self.num_preemptions = 0  # every preemption: retractions and policy preemptions
        self.num_retractions = 0  # preemptions because the KV pool ran dry
        self.num_prefill_tokens = 0  # prompt (and recompute) tokens launched
        self.num_prefix_hit_tokens = 0  # tokens admission found in the prefix cache instead
        self.num_swapped_out = 0
        self.num_swapped_in = 0

    # -- intake ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.policy.add(request)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.awaiting) or self.policy.num_waiting() > 0

    @property
    def num_waiting(self) -> int:
        """Requests neither running nor finished. Two len()s, no iteration over a policy's queues:
        the server thread reads this while the engine thread changes them."""
        return len(self.requests) - len(self.running) - len(self.awaiting)

    # -- the step -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Build the next batch and advance its requests' lengths as if it were already launched."""
        self.policy.observe(SchedulerLoad(self.clock(), self.policy.num_waiting(), len(self.running),
                                          self.kv.usage, self.slots.num_free))
        self.kv.reservation.on_step()
        budget = self.limits.max_num_batched_tokens
        picked: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        writes: list[PoolWrite] = []

        # Policy-driven preemption (priority, srtf): when every slot is taken, or memory cannot take
        # the next waiting request, the policy may name running requests to make room for more
        # urgent waiting ones. It happens before the budget is handed out, so a request is never
        # both in this batch and preempted. FCFS names none. These preemptions do not block
        # admission below: making room for admission is their whole point.
        evicted: list[Request] = []
        if self.policy.num_waiting() > 0 and (self.slots.num_free == 0 or not self._fits(self.policy.peek())):
            for victim in self.policy.preempt_for_waiting(list(self.running)):
                if victim.status is RequestStatus.RUNNING and victim.kv_push is None:
                    self._preempt(victim)
                    evicted.append(victim)

        # Decodes before prefill chunks, each group in the policy's order: a chunk ranked ahead of
        # the decodes would take the whole token budget and stall every decode for a step (with
        # sjf/srtf a promoted long request often prefills ahead of younger decoding ones).
        ranked = self.policy.order_running(self.running)
        decoding = [r for r in ranked if r.num_tokens - r.num_computed_tokens <= 1]
        ordered = decoding + [r for r in ranked if r.num_tokens - r.num_computed_tokens > 1]
        for req in ordered:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self._tokens_to_run(req, budget)
            if n == 0:
                continue
            while not (grown := self.kv.grow(req.request_id, req.num_computed_tokens + n)):
                # Only a request the policy ranks below this one loses its pages for it, even one already
                # picked (decodes are picked first, whatever their rank): it leaves the batch and gives
                # its tokens back to the budget. A pushing request's pages may be read by the
                # transport: it is never a victim.
                below = {id(r) for r in ranked[ranked.index(req) + 1:]}  # only when memory ran out: rare
                others = [r for r in self.running if id(r) in below and r.kv_push is None]
                victim = self.policy.victim(others) if others else req
                if victim is req and req.kv_push is not None:
                    break  # it waits a step for memory instead
                for i, (p, m) in enumerate(picked):
                    if p is victim:
                        del picked[i]
                        budget += m
                        break
                self._preempt(victim, retract=True)
                preempted.append(victim)
                if victim is req:
                    break
            if grown and req.status is RequestStatus.RUNNING:
                picked.append((req, n))
                budget -= n

        # No admissions in a step that had to preempt: memory is short already.
        # Slots, not len(running), bound admission: a finished request still draining holds its slot.
        # First pages this batch computes from scratch: a waiting request starting with one of them
        # waits a step and then reads them from the prefix cache instead of computing them twice
        # (n > 1 choices, a burst of questions about one document; SGLang's in-batch prefix check).
        fresh_heads: set[tuple[int, ...]] = set()
        while not preempted and budget > 0 and self.slots.num_free > 0:
            req = self.policy.peek()
            if req is None:
                break
            match = self._match(req)
            if req.remote_prefill is not None:  # a peer computes its prompt: no budget, no batch
                if not self.kv.can_admit(req.num_tokens, req.remaining_new_tokens, match):
                    break
                self.policy.pop()
                self._admit(req, match)
                if not self.kv.grow(req.request_id, req.num_tokens):
                    raise AssertionError("admitted request could not get its prompt's pages")
                continue
            head = self._head_page(req)
            if match is None and head in fresh_heads:
                break
            if not self.kv.can_admit(req.num_tokens, req.remaining_new_tokens, match):
                break
            cached = req.swapped[1] if req.swapped else match.num_pages * self.kv.page_size if match else 0
            if req.num_tokens - cached > budget and not self.limits.enable_chunked_prefill:
                break
            n = min(req.num_tokens - cached, budget)
            self.policy.pop()
            self._admit(req, match)
            if not self.kv.grow(req.request_id, req.num_computed_tokens + n):  # admission promised this
                raise AssertionError("admitted request could not get its first pages")
            if req.swapped:
                self._swap_in(req)
            if head is not None and req.num_computed_tokens == 0:
                fresh_heads.add(head)
            writes.append(PoolWrite(req.slot, 0, tuple(req.known_token_ids())))
            picked.append((req, n))
            budget -= n

        if not picked:
            return None  # requests that kv_arrived keep their pending pool writes for the next batch
        # Requests whose KV a peer computed start with their prompt and first token in the pool,
        # written before any admission's write (a slot freed and taken again in between).
        arrived = [PoolWrite(w.slot, 0, tuple(r.known_token_ids())) for r, w in self._arrived_writes
                   if r.status is RequestStatus.RUNNING and r.slot == w.slot]
        self._arrived_writes = []
        return self._launch(picked, arrived + writes, evicted + preempted)

    def _tokens_to_run(self, req: Request, budget: int) -> int:
        pending = req.num_tokens - req.num_computed_tokens
        if pending == 0 or req.remaining_new_tokens <= 0:
            # All its tokens are computed and its last sample is in flight: a length finish,
            # known in advance, so it is left out of the next batch.
            return 0
        if pending > budget and not self.limits.enable_chunked_prefill:
            return 0
        return min(pending, budget)

    def _match(self, req: Request) -> PrefixMatch | None:
        # A swapped-out request brings its own KV back; it reads nothing from the cache.
        # A request still owed prompt logprobs computes its whole prompt: cached pages have no logits.
        if req.swapped or req.needs_prompt_logprobs:
            return None
        return self.kv.match_prefix(req.known_token_ids())

    def _head_page(self, req: Request) -> tuple[int, ...] | None:
        """The first page of ``req``'s tokens, if the prefix cache could serve it."""
        ps = self.kv.page_size
        if self.kv.prefix_cache is None or req.swapped or req.num_tokens <= ps or req.needs_prompt_logprobs:
            return None
        tokens = req.prompt_token_ids if req.num_prompt_tokens >= ps else req.known_token_ids()
        return tuple(tokens[:ps])

    def _fits(self, req: Request | None) -> bool:
        """Whether memory (not slots) would let ``req`` in now."""
        return req is None or self.kv.can_admit(req.num_tokens, req.remaining_new_tokens, self._match(req))

    def _admit(self, req: Request, match: PrefixMatch | None) -> None:
        req.slot = self.slots.allocate(1)[0]
        self.kv.admit(req.request_id, req.num_tokens, req.remaining_new_tokens, match)
        req.num_computed_tokens = match.num_pages * self.kv.page_size if match else 0
        if req.swapped:
            req.num_computed_tokens = req.swapped[1]  # restored from host memory, not a cache hit
        else:
            self.num_prefix_hit_tokens += req.num_computed_tokens
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
            req.admit_time = self.clock()
        if req.remote_prefill is not None:
            req.status = RequestStatus.AWAIT_KV
            self.awaiting[req.request_id] = req
            self.newly_awaiting.append(req)
            self.kv.set_state(req.request_id, TableState.RECEIVING)
            return
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    # -- disaggregation -------------------------------------------------------------------
    def take_awaiting(self) -> list[Request]:
        """Requests admitted into AWAIT_KV since the last call: their peer must be told."""
        new, self.newly_awaiting = self.newly_awaiting, []
        for r in new:
            if r.status is not RequestStatus.AWAIT_KV and self.kv.holds(r.request_id):
                self.kv.free(r.request_id)  # left before its peer was told: nobody can write there
        return [r for r in new if r.status is RequestStatus.AWAIT_KV]

    def kv_arrived(self, req: Request) -> None:
        """The peer wrote the whole prompt's KV and sampled its first token: the request runs and
        decodes from there (the caller appends that token through the output stage)."""
        if req.status is not RequestStatus.AWAIT_KV:
            raise AssertionError(f"request {req.request_id} is not awaiting KV")
        del self.awaiting[req.request_id]
        req.remote_prefill = None  # from here it is a local request: a preemption recomputes it here
        self.kv.set_state(req.request_id, TableState.PRIVATE)
        req.num_computed_tokens = req.num_prompt_tokens
        req.num_tokens = req.num_prompt_tokens + 1  # the peer's sample counts as launched
        if self.kv.prefix_cache is not None:
            self.kv.cache(req.request_id, req.prompt_token_ids)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        assert req.slot is not None
        self._arrived_writes.append((req, PoolWrite(req.slot, 0, ())))  # ids filled at launch: the token is known then

    def release_quarantined(self, request_id: str) -> None:
        """The peer will write no more into a left request's pages: they go back to the pool."""
        if self.kv.state(request_id) is not TableState.QUARANTINED:
            raise AssertionError(f"request {request_id}'s pages are not quarantined")
        self.kv.free(request_id)

    def unhold(self, req: Request) -> None:
        """The transport is done reading a pushing request's pages."""
        req.kv_hold = False
        if req in self.draining and req.num_inflight == 0:
            self.draining.remove(req)
            self._release(req)

    def _swap_out(self, req: Request) -> None:
        """Copy a retracted request's KV to host memory if there is room (else it recomputes)."""
        assert self.swap is not None
        # Keep the last known token to compute on resume: its logits give the next sample.
        tokens = min(req.num_computed_tokens, len(req.known_token_ids()) - 1)
        pages = self.kv.pages_for(tokens)
        handle = self.swap.reserve(pages)
        if handle is None:
            return
        self._swaps.append(SwapOp(SwapKind.OUT, handle, tuple(self.kv.page_tables[req.request_id][:pages])))
        req.swapped = (handle, tokens)
        self.num_swapped_out += 1

    def take_drops(self) -> tuple[SwapOp, ...]:
        """Pending ops if they only free host buffers: an idle engine runs them itself rather than
        keep the memory until the next batch."""
        if not self._swaps or any(op.kind is not SwapKind.DROP for op in self._swaps):
            return ()
        drops, self._swaps = tuple(self._swaps), []
        return drops

    def _swap_in(self, req: Request) -> None:
        assert self.swap is not None and req.swapped is not None
        handle, tokens = req.swapped
        pages = self.kv.page_tables[req.request_id][: self.kv.pages_for(tokens)]
        self._swaps.append(SwapOp(SwapKind.IN, handle, tuple(pages)))
        self.swap.release(handle)
        req.swapped = None
        self.num_swapped_in += 1

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
            if n > 1 or not samples:
                self.num_prefill_tokens += n
                if self.kv.prefix_cache is not None:  # its whole pages can serve the next same-prefix request
                    self.kv.cache(req.request_id, req.known_token_ids()[: req.num_computed_tokens])
            if samples:
                req.num_tokens += 1
        seqs.sort(key=lambda s: s.num_tokens != 1)  # decodes first; stable keeps policy order
        num_decodes = sum(1 for s in seqs if s.num_tokens == 1)
        swaps, self._swaps = tuple(self._swaps), []
        freed, self._freed_slots = tuple(self._freed_slots), []
        return ScheduledBatch(next(self._step_ids), tuple(seqs), num_decodes, tuple(writes), tuple(preempted), swaps,
                              freed)

    # -- leaving --------------------------------------------------------------------------
    def _preempt(self, req: Request, retract: bool = False) -> None:
        """Recompute preemption: drop its KV and slot, keep its tokens, wait again at the front.

        ``retract``: the pool ran dry (not the policy's choice), so the reservation gets bolder
        about what requests will need. With prefix caching on, the KV it had computed stays
        cached, so the recompute is mostly a cache hit unless the pages get evicted meanwhile.
        """
        if retract:
            self.num_retractions += 1
            self.kv.reservation.on_retract()
            if self.swap is not None:
                self._swap_out(req)
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
            if req.num_inflight or req.kv_hold:
                self.draining.append(req)
            else:
                self._release(req)
        elif req.status is RequestStatus.AWAIT_KV:
            # The peer may still write into its pages: they stay quarantined, the slot goes now.
            del self.awaiting[req.request_id]
            self.kv.set_state(req.request_id, TableState.QUARANTINED)
            self.slots.free([req.slot])
            self._freed_slots.append(req.slot)
            req.slot = None
        else:
            self.policy.remove(req)
            if req.swapped:
                handle = req.swapped[0]
                if any(op.handle == handle for op in self._swaps):  # its OUT never ran: cancel it
                    self._swaps = [op for op in self._swaps if op.handle != handle]
                else:
                    self._swaps.append(SwapOp(SwapKind.DROP, handle))
                assert self.swap is not None
                self.swap.release(handle)
                req.swapped = None
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        if reason in (FinishReason.STOP, FinishReason.LENGTH):  # what the request really used
            self.kv.reservation.on_finish(len(req.output_token_ids), req.max_new_tokens)
        del self.requests[req.request_id]
        self.policy.on_finish(req)  # predictors learn lengths; fifo/static/fair release their hold

    def batch_done(self, batch: ScheduledBatch) -> None:
        """The batch's outputs are processed: nothing in flight reads its requests through it any more."""
        for seq in batch.seqs:
            seq.request.num_inflight -= 1
        if self.draining:
            done = [r for r in self.draining if r.num_inflight == 0 and not r.kv_hold]
            for req in done:
                self.draining.remove(req)
                self._release(req)

    # -- after a failed step --------------------------------------------------------------
    def requeue(self, req: Request) -> None:
        """Send a running request back to wait and recompute (its batch failed for someone else's fault)."""
        self._preempt(req)

    def forget_batch(self, batch: ScheduledBatch) -> None:
        """A launched batch that will never be processed: let go of its requests as if it had been,
        and keep its slot re-poisoning for the next batch."""
        self._freed_slots.extend(batch.freed_slots)
        self.batch_done(batch)

    def reset_swaps(self) -> None:
        """Forget every host copy of KV (a failed batch may have run its swap ops or not); those
        requests recompute instead."""
        for req in self.requests.values():
            if req.swapped is not None:
                assert self.swap is not None
                self.swap.release(req.swapped[0])
                req.swapped = None
        self._swaps = []

    def _release(self, req: Request) -> None:
        # Tokens whose KV its pages hold: computed by a launched batch and known on the host
        # (an in-flight sample's value is not, and its position's KV is not cached).
        known = req.known_token_ids() if self.kv.prefix_cache is not None else None
        self.kv.free(req.request_id, known[: req.num_computed_tokens] if known is not None else None)
        self.slots.free([req.slot])
        self._freed_slots.append(req.slot)
        req.slot = None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        if self.swap is not None:
            self.swap.check()
        self.slots.check()
        holders = self.running + self.draining + list(self.awaiting.values())
        if self.slots.num_in_use != len(holders):
            raise AssertionError(f"{self.slots.num_in_use} slots in use for {len(holders)} requests holding slots")
        if any(not self.kv.holds(r.request_id) for r in holders):
            raise AssertionError("a running request holds no page table")
        quarantined = self.kv.tables_in(TableState.QUARANTINED)
        if len(self.kv.page_tables) != len(holders) + len(quarantined):
            raise AssertionError("a page table has no running, draining, awaiting owner and is not quarantined")
        if any(rid in self.requests for rid in quarantined):
            raise AssertionError("a live request's pages are quarantined")
        if any(self.kv.state(rid) is not TableState.RECEIVING for rid in self.awaiting):
            raise AssertionError("a request awaiting KV does not hold receiving pages")
        if any(r.status is not RequestStatus.AWAIT_KV for r in self.awaiting.values()):
            raise AssertionError("a request in awaiting is not AWAIT_KV")
