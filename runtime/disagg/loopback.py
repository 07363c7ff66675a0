"""An in-process transport with fault injection, for tests: agents in one process share a fabric,
and a WRITE is a memmove between addresses both registered.

Faults (``Faults``, settable per fabric at any time): ``delay_s`` holds every WRITE that long
before it lands; ``drop`` leaves WRITEs pending forever (a hung network: only a lease ends them);
``error`` fails them; ``kill(name)`` is a dead peer: WRITEs to or from it fail, its notifications
never arrive. As with NIXL, a WRITE's notification is delivered only after its data landed.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor.runtime.disagg.transport import Desc, TransportError, XferState
from conveyor.runtime.engine.executor import KVRegion


@dataclass
class Faults:
    delay_s: float = 0.0
    drop: bool = False
    error: bool = False


@dataclass
class _Write:
    src: str
    dst: str
    local: list[Desc]
    remote: list[Desc]
    notif: bytes
    due: float
    drop: bool
    state: XferState = XferState.PENDING


@dataclass
class LoopbackFabric:
    faults: Faults = field(default_factory=Faults)
    agents: dict[str, LoopbackTransport] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes_written: int = 0

    def kill(self, name: str) -> None:
        with self.lock:
            self.dead.add(name)


FABRIC = LoopbackFabric()  # the process-wide one ``make_transport("loopback", ...)`` joins
_ids = itertools.count()


class LoopbackTransport:
    def __init__(self, fabric: LoopbackFabric, name: str) -> None:
        self.fabric = fabric
        self.name = name
        self.regions: list[KVRegion] = []
        self.peers: set[str] = set()
        self._inbox: list[tuple[str, bytes]] = []
        with fabric.lock:
            fabric.agents[name] = self

    def register(self, region: KVRegion) -> None:
        if region.mem != "DRAM":
            raise TransportError("the loopback transport moves host memory only")
        self.regions.append(region)

    def metadata(self) -> bytes:
        return self.name.encode()

    def add_peer(self, metadata: bytes) -> str:
        name = metadata.decode()
        with self.fabric.lock:
            if name not in self.fabric.agents or name in self.fabric.dead:
                raise TransportError(f"no loopback agent {name!r}")
        self.peers.add(name)
        return name

    def remove_peer(self, peer: str) -> None:
        self.peers.discard(peer)

    def _check(self, descs: Sequence[Desc], regions: list[KVRegion]) -> None:
        for addr, n, _ in descs:
            if not any(r.addr <= addr and addr + n <= r.addr + r.nbytes for r in regions):
                raise TransportError(f"descriptor {addr:#x}+{n} lies outside every registered region")

    def write(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notif: bytes = b"") -> _Write:
        if peer not in self.peers:
            raise TransportError(f"unknown peer {peer!r}")
        if [n for _, n, _ in local] != [n for _, n, _ in remote]:
            raise TransportError("local and remote descriptors differ in length")
        f = self.fabric.faults
        w = _Write(self.name, peer, list(local), list(remote), notif, time.monotonic() + f.delay_s, f.drop)
        if f.error:
            w.state = XferState.ERROR
        self._check(local, self.regions)
        self._check(remote, self.fabric.agents[peer].regions)
        return w

    def poll(self, handle: _Write) -> XferState:
        if handle.state is not XferState.PENDING:
            return handle.state
        with self.fabric.lock:
            if handle.dst in self.fabric.dead or handle.src in self.fabric.dead:
                handle.state = XferState.ERROR
                return handle.state
            if handle.drop or time.monotonic() < handle.due:
                return handle.state
            for (src, n, _), (dst, _, _) in zip(handle.local, handle.remote):
                ctypes.memmove(dst, src, n)
                self.fabric.bytes_written += n
            handle.state = XferState.DONE
            if handle.notif:
                self.fabric.agents[handle.dst]._inbox.append((self.name, handle.notif))
        return handle.state

    def cancel(self, handle: _Write) -> None:
        if handle.state is XferState.PENDING:
            handle.state = XferState.ERROR  # never lands now

    def notify(self, peer: str, msg: bytes) -> None:
        with self.fabric.lock:
            if peer in self.fabric.dead or self.name in self.fabric.dead:
                return
            if peer not in self.fabric.agents:
                raise TransportError(f"unknown peer {peer!r}")
            self.fabric.agents[peer]._inbox.append((self.name, msg))

    def notifications(self) -> list[tuple[str, bytes]]:
        with self.fabric.lock:
            if self.name in self.fabric.dead:
                return []
            out, self._inbox = self._inbox, []
        return out

    def close(self) -> None:
        with self.fabric.lock:
            self.fabric.agents.pop(self.name, None)
