"""The decode worker's half, on the engine thread: announce admitted rooms to their prefill worker,
turn ``room:done`` into a running request, and fail or free everything else in bounded time.

A room is AWAIT_KV from admission (pages RECEIVING) until P's ``done`` notice (-> RUNNING, P's token
is output 0) or a failure: P's ``abort`` notice, /kv/ready refused, P found dead, or the lease
running out. A room whose request left while P might still write (client abort, lease) stays
QUARANTINED until P's notice for it, P known dead (its port refuses), or the lease plus a grace. P that never heard of
a room (its /kv/ready refused, /kv/abort answered 404) cannot write: those pages are freed at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import msgspec
import structlog

from conveyor.memory import TableState
from conveyor.runtime.disagg.role import Arrived, Fail
from conveyor.runtime.disagg.stats import TransferStats
from conveyor.runtime.disagg.transport import Transport
from conveyor.runtime.disagg.wire import KVReady, PeerInfo, RoomNotice, decode_notice
from conveyor.runtime.engine.executor import KVRegion
from conveyor.runtime.engine.outputs import RequestOutput, SampleLogprobs, TokenLogprob
from conveyor.scheduler import Request, RequestStatus, ScheduledBatch, Scheduler

log = structlog.get_logger("conveyor.disagg")

FAILURE = "kv transfer failed"  # error prefix the server answers 503 + Retry-After for
QUARANTINE_GRACE_S = 2.0  # past the lease: a WRITE posted just before it may still be landing


class RemotePrefill(NamedTuple):
    """``Request.remote_prefill`` on D: the router's room id and the prefill worker to use."""

    room: str
    prefill_url: str


class ChannelEvent(NamedTuple):
    kind: str  # "accepted" | "refused" | "unsure" | "abort_unknown" | "peer_dead" | "peer_unreachable"
    room: str = ""
    url: str = ""
    error: str = ""


class PrefillChannel(Protocol):
    """D -> P side channel; calls return at once, results come back from ``events``."""

    peer: PeerInfo | None  # this worker's, for a P that asks for it again (428 peer_unknown)

    def post_ready(self, url: str, ready: KVReady) -> None: ...

    def post_abort(self, url: str, room: str) -> None: ...

    def watch(self, urls: set[str]) -> None:
        """The prefill workers D waits on now: their liveness is checked."""
        ...

    def events(self) -> list[ChannelEvent]: ...

    def close(self) -> None: ...


@dataclass
class _Room:
    req: Request
    url: str
    sent: float
    deadline: float  # AWAIT_KV past this fails
    release_by: float  # QUARANTINED past this frees
    num_pages: int = 0  # pages P writes (the uncached tail)
    quarantined_at: float | None = None
    abort_sent: bool = False


class DecodeReceiver:
    def __init__(self, transport: Transport, region: KVRegion, scheduler: Scheduler, channel: PrefillChannel,
                 lease_s: float, post_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.region = region
        self.scheduler = scheduler
        self.channel = channel
        self.lease_s = lease_s
        self.post_timeout_s = post_timeout_s
        self.clock = clock
        self.rooms: dict[str, _Room] = {}  # by room id (the request id is the server's own)
        self.accepted_by: set[str] = set()  # P URLs that took a room: they have D's metadata
        self.stats = TransferStats()
        self._peer = PeerInfo(metadata=transport.metadata(), addr=region.addr, layer_stride=region.layer_stride,
                              page_stride=region.page_stride, device_id=region.device_id, mem=region.mem,
                              **region.compat._asdict())
        channel.peer = self._peer

    def busy(self) -> bool:
        return bool(self.rooms)

    def check(self, req: Request) -> None:
        if req.kv_push is not None:
            raise ValueError("a request to push KV needs --role prefill")

    def add(self, req: Request) -> None:
        pass  # announced once admitted (after_launch): P hears of nothing D cannot hold

    def after_launch(self) -> None:
        if awaiting := self.scheduler.take_awaiting():
            self.announce(awaiting)

    def after_batch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        pass

    def announce(self, reqs: list[Request]) -> None:
        """Tell each newly admitted room's P what to compute and where to write it."""
        ps = self.scheduler.kv.page_size
        now = self.clock()
        for req in reqs:
            rp: RemotePrefill = req.remote_prefill
            table = self.scheduler.kv.page_tables[req.request_id]
            first = req.num_computed_tokens // ps  # prefix-cache hits on D are not sent again
            n_pages = -(-req.num_prompt_tokens // ps)
            ready = KVReady(room=rp.room, agent=self.transport.name, token_ids=req.prompt_token_ids,
                            params=msgspec.to_builtins(req.params), first_page=first, pages=table[first:n_pages],
                            lease_s=self.lease_s, peer=None if rp.prefill_url in self.accepted_by else self._peer)
            deadline = now + self.lease_s
            self.rooms[rp.room] = _Room(req, rp.prefill_url, now, deadline,
                                        deadline + self.post_timeout_s + QUARANTINE_GRACE_S, len(ready.pages))
            self.channel.post_ready(rp.prefill_url, ready)

    def poll(self, arrived: Arrived, fail: Fail) -> list[RequestOutput]:
        """Apply notices, channel events and deadlines. ``arrived`` starts a request with P's token,
        ``fail`` ends one with an error (it becomes QUARANTINED if it was awaiting)."""
        outputs: list[RequestOutput] = []
        for _, raw in self.transport.notifications():
            try:
                notice = decode_notice(raw)
            except msgspec.DecodeError:
                log.warning("undecodable notification", raw=raw[:64])
                continue
            outputs += self._on_notice(notice, arrived, fail)
        for ev in self.channel.events():
            outputs += self._on_event(ev, fail)
        now = self.clock()
        for room in list(self.rooms.values()):
            req = room.req
            if req.status is RequestStatus.AWAIT_KV and now > room.deadline:
                outputs += fail(req, f"{FAILURE}: the prefill worker did not deliver within the "
                                     f"{self.lease_s:g} s lease")
                self.stats.count("expired")
            if req.is_finished and room.quarantined_at is None:
                room.quarantined_at = now  # left while P may write: the client went, or a failure above
            if room.quarantined_at is not None and not room.abort_sent:
                room.abort_sent = True
                self.channel.post_abort(room.url, req.remote_prefill.room)
            if room.quarantined_at is not None and now > room.release_by:
                self._release(room)
        self.channel.watch({r.url for r in self.rooms.values()})
        return outputs

    def _on_notice(self, notice: RoomNotice, arrived: Arrived, fail: Fail) -> list[RequestOutput]:
        room = self.rooms.get(notice.room)
        if room is None:
            log.warning("notice for an unknown room", room=notice.room, kind=notice.kind)
            return []
        req = room.req
        if req.status is RequestStatus.AWAIT_KV:
            if notice.kind == "done":
                self.stats.count("ok")
                now = self.clock()
                self.stats.seconds += now - room.sent
                # TTFT split: D admission, then P's queue and compute, the rest is side channel + transfer tail.
                wait = now - room.sent
                p_part = (notice.queue_s or 0.0) + (notice.compute_s or 0.0)
                log.info("kv room done", room=notice.room, d_admission_s=_r(room.sent - req.arrival_time),
                         p_queue_s=_r(notice.queue_s), p_compute_s=_r(notice.compute_s),
                         transfer_tail_s=_r(wait - p_part), pages=room.num_pages)
                self.stats.bytes += room.num_pages * self.region.page_stride * self.region.num_layers
                del self.rooms[notice.room]
                lp = None
                if notice.logprob is not None:
                    lp = SampleLogprobs(token_id=notice.token, logprob=notice.logprob,
                                        top=[TokenLogprob(i, v) for i, v in notice.top or ()])
                return arrived(req, notice.token, lp)
            self.stats.count("error")
            out = fail(req, f"{FAILURE}: the prefill worker aborted: {notice.error or 'no reason given'}")
            self._release(room)  # P will write no more
            return out
        if req.is_finished:  # quarantined: P's last word on it
            self._release(room)
        return []

    def _on_event(self, ev: ChannelEvent, fail: Fail) -> list[RequestOutput]:
        if ev.kind == "accepted":
            self.accepted_by.add(ev.url)
            return []
        if ev.kind in ("peer_dead", "peer_unreachable"):
            outputs: list[RequestOutput] = []
            self.accepted_by.discard(ev.url)
            for room in [r for r in self.rooms.values() if r.url == ev.url]:
                if room.req.status is RequestStatus.AWAIT_KV:
                    outputs += fail(room.req, f"{FAILURE}: the prefill worker {ev.url} is "
                                              f"{'gone' if ev.kind == 'peer_dead' else 'not answering'}")
                    self.stats.count("peer_dead")
                if ev.kind == "peer_dead":
                    self._release(room)  # a gone process writes nothing
                # unreachable: it may only be stalled and still write, so its pages wait out the lease
            return outputs
        room = self.rooms.get(ev.room)
        if room is None:
            return []
        if ev.kind == "refused":  # P answered no: it will never write
            self.stats.count("rejected")
            out = fail(room.req, f"{FAILURE}: {ev.error}") if room.req.status is RequestStatus.AWAIT_KV else []
            self._release(room)
            return out
        if ev.kind == "abort_unknown":  # P never had it
            self._release(room)
            return []
        if ev.kind == "unsure" and room.req.status is RequestStatus.AWAIT_KV:  # P may have it: quarantine
            self.stats.count("error")
            return fail(room.req, f"{FAILURE}: {ev.error}")
        return []

    def _release(self, room: _Room) -> None:
        req = room.req
        self.rooms.pop(req.remote_prefill.room, None)
        if req.status is RequestStatus.AWAIT_KV:
            raise AssertionError("releasing the pages of a request still awaiting KV")
        if self.scheduler.kv.holds(req.request_id) and \
                self.scheduler.kv.state(req.request_id) is TableState.QUARANTINED:
            self.scheduler.release_quarantined(req.request_id)
        if room.quarantined_at is not None:
            self.stats.quarantine_seconds += self.clock() - room.quarantined_at

    def close(self) -> None:
        self.channel.close()


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 5)
