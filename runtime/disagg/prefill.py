"""The prefill worker's half, on the engine thread: push each room's KV into its decode worker.

A room's request runs in the normal pipeline (chunked, batched) with ``max_new_tokens = 1``. After
each of its batches is processed (the engine's one host wait, so its KV is written), the pages that
batch completed are posted as one WRITE into D's pages; the batch that sampled the first token
posts the rest, partial page included, once every earlier WRITE is done, carrying ``room:done``.
Its pages stay ``SENDING`` (the request holds them, ``kv_hold``) until every WRITE is done or
failed. A room that fails (a WRITE error: D died; the lease ran out; D or a client aborted) waits
for its WRITEs to settle, tells D ``abort`` and frees. Nothing is posted after the lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from conveyor.memory import TableState
from conveyor.runtime.disagg.role import Arrived, Fail
from conveyor.runtime.disagg.stats import TransferStats
from conveyor.runtime.disagg.transport import RemotePool, Transport, TransportError, XferState, page_descriptors
from conveyor.runtime.disagg.wire import KVReady, PeerInfo, RoomNotice, encode_notice
from conveyor.runtime.engine.executor import KVRegion
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.scheduler import Request, SamplingParams, ScheduledBatch, Scheduler

log = structlog.get_logger("conveyor.disagg")

SETTLE_GRACE_S = 2.0  # after the lease: how long a failed room waits for its WRITEs before cancelling them


class IncompatiblePeer(ValueError):
    """The peer's KV pool cannot take this worker's pages (the message says which field differs)."""


def check_compat(region: KVRegion, peer: PeerInfo) -> None:
    mine = region.compat
    for name in mine._fields:  # PeerInfo carries every KVCompat field, flat
        if getattr(mine, name) != getattr(peer, name):
            raise IncompatiblePeer(f"peer.{name}: the decode worker has {getattr(peer, name)!r}, this prefill "
                                   f"worker {getattr(mine, name)!r}; both must serve the same model the same way")
    if peer.page_stride != region.page_stride:
        raise IncompatiblePeer(f"peer.page_stride: {peer.page_stride} bytes per page, here {region.page_stride}")


@dataclass(frozen=True)
class PushTarget:
    """Where a room's KV goes (set as ``Request.kv_push`` by the /kv/ready handler)."""

    room: str
    agent: str
    first_page: int
    pages: tuple[int, ...]
    deadline: float  # monotonic; nothing is posted after it
    peer: PeerInfo | None


def push_request(req: Request, ready: KVReady, now: float) -> Request:
    """Make a validated request (built from ``ready``'s ids and params, ``ready.room`` as its id) a
    room: one token, its KV pushed into D's pages, nothing posted after the lease from ``now``."""
    req.max_new_tokens = 1
    req.kv_push = PushTarget(ready.room, ready.agent, ready.first_page, tuple(ready.pages), now + ready.lease_s,
                             ready.peer)
    return req


def ready_params(ready: KVReady) -> SamplingParams:
    """The sampling parameters D sent; a ``msgspec.ValidationError`` names a bad field."""
    return msgspec.convert(ready.params, SamplingParams)


@dataclass
class _Room:
    req: Request
    target: PushTarget
    next_page: int  # prompt page index: everything below it is posted (or not D's to get)
    handles: list[Any] = field(default_factory=list)
    final: bool = False  # the first token is sampled: the last WRITE (with room:done) is due
    notice: RoomNotice | None = None
    posted: bool = False  # ... and posted
    failed: str | None = None
    result: str = "ok"
    started: float | None = None
    bytes: int = 0


class PrefillPusher:
    def __init__(self, transport: Transport, region: KVRegion, scheduler: Scheduler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.region = region
        self.scheduler = scheduler
        self.clock = clock
        self.peers: dict[str, RemotePool] = {}
        self.rooms: dict[str, _Room] = {}
        self.stats = TransferStats()

    def busy(self) -> bool:
        return bool(self.rooms)

    def check(self, req: Request) -> None:
        if req.remote_prefill is not None:
            raise ValueError("a request with a remote prefill needs --role decode")

    def after_launch(self) -> None:
        pass

    # -- intake ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.kv_push is None:
            return  # not a room (nothing on P serves clients, but an embedded caller may)
        target: PushTarget = req.kv_push
        req.kv_hold = True
        self.rooms[req.request_id] = _Room(req, target, next_page=target.first_page)
        if target.peer is not None and target.agent not in self.peers:
            try:
                check_compat(self.region, target.peer)
                name = self.transport.add_peer(target.peer.metadata)
            except (IncompatiblePeer, TransportError) as e:
                self.rooms[req.request_id].failed = str(e)
                return
            p = target.peer
            self.peers[name] = RemotePool(p.addr, p.layer_stride, p.page_stride, p.device_id)
        elif target.agent not in self.peers:
            self.rooms[req.request_id].failed = f"unknown decode agent {target.agent!r}"

    # -- after each processed batch -------------------------------------------------------
    def after_batch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        ps = self.scheduler.kv.page_size
        for seq in batch.seqs:
            room = self.rooms.get(seq.request.request_id)
            if room is None or room.failed or seq.epoch != seq.request.num_preemptions:
                continue
            if seq.request.is_finished and not seq.request.output_token_ids:
                continue  # aborted: poll() ends the room
            if seq.samples and seq.request.output_token_ids:
                room.final = True  # posted from poll(), once every earlier WRITE is done
                out = next((o for o in outputs if o.request_id == seq.request.request_id), None)
                room.notice = self._done_notice(room, out)
            else:
                self._post(room, (seq.start + seq.num_tokens) // ps)

    def _done_notice(self, room: _Room, out: RequestOutput | None) -> RoomNotice:
        token = room.req.output_token_ids[0]
        lp = out.logprobs[0] if out is not None and out.logprobs else None
        req = room.req
        queue = req.admit_time - req.arrival_time if req.admit_time is not None else None
        compute = req.first_token_time - req.admit_time \
            if req.first_token_time is not None and req.admit_time is not None else None
        return RoomNotice(room=room.target.room, kind="done", token=token,
                          logprob=lp.logprob if lp is not None else None,
                          top=[(t.token_id, t.logprob) for t in lp.top] if lp is not None else None,
                          queue_s=queue, compute_s=compute)

    def _post(self, room: _Room, upto: int, notif: bytes = b"") -> None:
        """WRITE prompt pages [next_page, upto) into D's pages for them."""
        t = room.target
        upto = min(upto, t.first_page + len(t.pages))
        if upto <= room.next_page and not notif:
            return
        if self.clock() > t.deadline:
            room.failed, room.result = "the lease expired before the KV was sent", "expired"
            return
        table = self.scheduler.kv.page_tables[room.req.request_id]
        idx = range(room.next_page, upto)
        src = [table[i] for i in idx]
        dst = [t.pages[i - t.first_page] for i in idx]
        local, remote = page_descriptors(self.region, self.peers[t.agent], src, dst)
        if not local:  # nothing left but the notice (a prompt whose pages all went earlier)
            try:
                self.transport.notify(t.agent, notif)
            except TransportError as e:
                room.failed, room.result = str(e), "error"
                return
            room.next_page = upto
            return
        try:
            room.handles.append(self.transport.write(t.agent, local, remote, notif))
        except TransportError as e:
            room.failed, room.result = str(e), "error"
            return
        if room.started is None:
            room.started = self.clock()
            self.scheduler.kv.set_state(room.req.request_id, TableState.SENDING)
        room.bytes += sum(n for _, n, _ in local)
        room.next_page = upto

    # -- every step -----------------------------------------------------------------------
    def poll(self, arrived: Arrived, abort: Fail) -> list[RequestOutput]:
        """Advance every room; ``abort`` fails a request still in the scheduler (nothing arrives on P)."""
        outputs: list[RequestOutput] = []
        now = self.clock()
        for rid, room in list(self.rooms.items()):
            pending = []
            for h in room.handles:
                state = self.transport.poll(h)
                if state is XferState.PENDING:
                    pending.append(h)
                    continue
                self.transport.cancel(h)  # give the handle back either way
                if state is XferState.ERROR and not room.failed:
                    room.failed, room.result = "a KV WRITE to the decode worker failed", "error"
            room.handles = pending
            req = room.req
            if not room.failed and req.is_finished and not req.output_token_ids:
                room.failed, room.result = f"the request ended ({req.finish_reason.value})", "aborted"
            if not room.failed and now > room.target.deadline and not room.posted:
                room.failed, room.result = "the lease expired", "expired"
            if not room.failed and room.handles and now > room.target.deadline + SETTLE_GRACE_S:
                room.failed, room.result = "a KV WRITE did not complete within the lease", "expired"
            if room.failed:
                if not req.is_finished and req.request_id in self.scheduler.requests:
                    outputs += abort(req, f"kv transfer failed: {room.failed}")
                if room.handles and now < room.target.deadline + SETTLE_GRACE_S:
                    continue  # a WRITE may still read these pages: wait for it to settle
                for h in room.handles:
                    self.transport.cancel(h)
                self._end(room, RoomNotice(room=room.target.room, kind="abort", error=room.failed))
                continue
            if room.final and not room.posted and not room.handles:
                assert room.notice is not None
                room.posted = True
                n_pages = -(-req.num_prompt_tokens // self.scheduler.kv.page_size)
                self._post(room, n_pages, encode_notice(room.notice))
                continue
            if room.posted and not room.handles:
                self._end(room, None)
        return outputs

    def close(self) -> None:
        """The engine is closing: give back every WRITE handle still out (the pool goes next)."""
        for room in self.rooms.values():
            for h in room.handles:
                self.transport.cancel(h)
            room.handles = []

    def _end(self, room: _Room, notice: RoomNotice | None) -> None:
        """The room is over: tell D if it failed (its done rode on the last WRITE), free the pages."""
        if notice is not None and room.target.agent in self.peers:
            try:
                self.transport.notify(room.target.agent, encode_notice(notice))
            except TransportError as e:  # D is gone: nobody to tell
                log.info("abort notice not delivered", room=room.target.room, error=str(e))
        result = room.result if room.failed else "ok"
        self.stats.count(result)
        self.stats.bytes += room.bytes
        if room.started is not None:
            self.stats.seconds += self.clock() - room.started
        del self.rooms[room.req.request_id]
        self.scheduler.unhold(room.req)
        if room.failed:
            log.info("room failed", room=room.target.room, error=room.failed)

