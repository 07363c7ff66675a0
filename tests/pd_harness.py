"""A prefill and a decode engine core in one process over the loopback transport, stepped in turn,
with the side channel played in-process: the state machine of disaggregation without sockets."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from conveyor.memory import PAGE_STATES
from conveyor.runtime.build import attach_disagg, build_engine
from conveyor.runtime.disagg.decode import ChannelEvent, RemotePrefill
from conveyor.runtime.disagg.loopback import LoopbackFabric, LoopbackTransport
from conveyor.runtime.disagg.prefill import push_request, ready_params
from conveyor.runtime.disagg.wire import KVReady
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine.core import EngineCore
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.scheduler import SamplingParams

P_URL = "http://p"


class DirectChannel:
    """D's side channel, delivered by ``PDPair.deliver`` instead of HTTP."""

    peer = None

    def __init__(self) -> None:
        self.ready: list[tuple[str, KVReady]] = []
        self.aborts: list[tuple[str, str]] = []
        self.pending: list[ChannelEvent] = []
        self.watched: set[str] = set()
        self.num_ready = 0
        self.history: list[KVReady] = []

    def post_ready(self, url: str, ready: KVReady) -> None:
        self.ready.append((url, ready))
        self.history.append(ready)
        self.num_ready += 1

    def post_abort(self, url: str, room: str) -> None:
        self.aborts.append((url, room))

    def watch(self, urls: set[str]) -> None:
        self.watched = set(urls)

    def events(self) -> list[ChannelEvent]:
        out, self.pending = self.pending, []
        return out

    def close(self) -> None:
        pass


def make_core(model: Path, **overrides) -> EngineCore:
    cfg = dict(model=str(model), max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory=1 << 20,
               batch_invariant=True)
    cfg.update(overrides)
    return build_engine(EngineConfig(**cfg))


class PDPair:
    def __init__(self, model: Path, p_overrides: dict | None = None, d_overrides: dict | None = None,
                 lease_s: float = 30.0) -> None:
        self.fabric = LoopbackFabric()
        self.p = make_core(model, **(p_overrides or {}))
        self.d = make_core(model, **(d_overrides or {}))
        self.p_transport = LoopbackTransport(self.fabric, "P")
        self.d_transport = LoopbackTransport(self.fabric, "D")
        self.channel = DirectChannel()
        attach_disagg(self.p, msgspec.structs.replace(self.p.config, role="prefill"), transport=self.p_transport)
        attach_disagg(self.d, msgspec.structs.replace(self.d.config, role="decode", kv_lease_s=lease_s),
                      channel=self.channel, transport=self.d_transport)
        self.p_rooms: set[str] = set()
        self.p_dead = False
        self.d_dead = False
        self.outputs: dict[str, list[RequestOutput]] = {}

    def submit(self, rid: str, prompt: list[int], max_tokens: int = 8, room: str | None = None) -> None:
        req = self.d.inputs.make_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), rid)
        req.remote_prefill = RemotePrefill(room or f"room-{rid}", P_URL)
        assert self.d.add_request(req) is None

    def abort(self, rid: str) -> RequestOutput | None:
        """A client going away on D."""
        out = self.d.abort_request(rid)
        if out is not None:
            self.outputs.setdefault(rid, []).append(out)
        return out

    def deliver(self) -> None:
        """Play the HTTP side channel: D's /kv/ready and /kv/abort reach P (unless P is dead)."""
        ready, self.channel.ready = self.channel.ready, []
        aborts, self.channel.aborts = self.channel.aborts, []
        for url, msg in ready:
            if self.p_dead:
                self.channel.pending.append(ChannelEvent("refused", msg.room, url, "connection refused"))
                continue
            req = self.p.inputs.make_request(msg.token_ids, ready_params(msg), msg.room)
            push_request(req, msg, time.monotonic())
            assert self.p.add_request(req) is None
            self.p_rooms.add(msg.room)
            self.channel.pending.append(ChannelEvent("accepted", msg.room, url))
        for url, room in aborts:
            if self.p_dead:
                continue
            if room in self.p_rooms:
                self.p.abort_request(room)
            else:
                self.channel.pending.append(ChannelEvent("abort_unknown", room, url))

    def step(self) -> None:
        if not self.d_dead:
            for out in self.d.step():
                self.outputs.setdefault(out.request_id, []).append(out)
            self.d.check_integrity()
        self.deliver()
        if not self.p_dead:
            self.p.step()
            self.p.check_integrity()

    def run_until(self, cond, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, "condition not reached in time"
            self.step()

    def finished(self, rid: str) -> RequestOutput | None:
        outs = self.outputs.get(rid, [])
        return outs[-1] if outs and outs[-1].finished else None

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs.get(rid, []) for t in o.token_ids]

    def idle(self, core: EngineCore) -> bool:
        counts = core.scheduler.kv.page_counts()
        return not core.has_work() and all(counts[s] == 0 for s in PAGE_STATES if s not in ("free", "cached"))

    def close(self) -> None:
        for core in (self.p, self.d):
            core.close()


def colocated_tokens(core: EngineCore, prompts: dict[str, list[int]], max_tokens: int = 8) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    for rid, prompt in prompts.items():
        assert core.add_request(core.inputs.make_request(prompt, SamplingParams(max_tokens=max_tokens,
                                                                                temperature=0.0), rid)) is None
    deadline = time.monotonic() + 60
    while core.has_work():
        assert time.monotonic() < deadline
        for o in core.step():
            out[o.request_id].extend(o.token_ids)
    return out
