"""The KV transport interface: register the pool, exchange metadata, add and remove peers, post
one-sided WRITEs, poll and cancel them, and pass small notifications.

Descriptors come from page ids and the pool's strides (``page_descriptors``): one ``(address,
bytes, device)`` per layer and per run of pages that are consecutive on both sides. A notification
attached to a WRITE is delivered only after that WRITE's data landed (NIXL's guarantee, kept by
the loopback too), which is what makes ``room:done`` safe to act on.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from conveyor.runtime.engine.executor import KVRegion

Desc = tuple[int, int, int]  # address, bytes, device id


class XferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    ERROR = "error"


class TransportError(RuntimeError):
    """A transport call failed (peer unknown or gone, memory not registered)."""


class RemotePool(NamedTuple):
    """Where a peer's KV pool lives, as its first /kv/ready says."""

    addr: int
    layer_stride: int
    page_stride: int
    device_id: int


class Transport(Protocol):
    name: str  # this agent's name, unique per process

    def register(self, region: KVRegion) -> None: ...

    def metadata(self) -> bytes:
        """What a peer needs to reach this agent (``add_peer`` on its side)."""
        ...

    def add_peer(self, metadata: bytes) -> str:
        """Connect to a peer; returns its agent name."""
        ...

    def remove_peer(self, peer: str) -> None: ...

    def write(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notif: bytes = b"") -> Any:
        """Post a WRITE of ``local`` into ``remote`` (same lengths, in order); returns a handle."""
        ...

    def poll(self, handle: Any) -> XferState: ...

    def cancel(self, handle: Any) -> None:
        """Give the handle back (aborting the WRITE if it is still in progress)."""
        ...

    def notify(self, peer: str, msg: bytes) -> None:
        """A notification not bound to a WRITE."""
        ...

    def notifications(self) -> list[tuple[str, bytes]]:
        """(sender, message) received since the last call."""
        ...

    def close(self) -> None: ...


def _runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst) page pairs -> (src start, dst start, count) runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            s, d, n = runs[-1]
            runs[-1] = (s, d, n + 1)
        else:
            runs.append((src, dst, 1))
    return runs


def page_descriptors(local: KVRegion, remote: RemotePool, src_pages: Sequence[int],
                     dst_pages: Sequence[int]) -> tuple[list[Desc], list[Desc]]:
    """Descriptors that copy ``src_pages`` of the local pool into ``dst_pages`` of the remote one,
    every layer, K and V (a page of one layer is contiguous: ``[2, page_size, heads, head_dim]``)."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
    runs = _runs(list(zip(src_pages, dst_pages)))
    loc: list[Desc] = []
    rem: list[Desc] = []
    for layer in range(local.num_layers):
        for src, dst, n in runs:
            loc.append((local.addr + layer * local.layer_stride + src * local.page_stride,
                        n * local.page_stride, local.device_id))
            rem.append((remote.addr + layer * remote.layer_stride + dst * remote.page_stride,
                        n * remote.page_stride, remote.device_id))
    return loc, rem


def make_transport(kind: str, name: str) -> Transport:
    if kind == "nixl":
        from conveyor.runtime.disagg.nixl import NixlTransport

        return NixlTransport(name)
    if kind == "loopback":
        from conveyor.runtime.disagg.loopback import FABRIC, LoopbackTransport

        return LoopbackTransport(FABRIC, name)
    raise ValueError(f"unknown KV transport {kind!r}: expected nixl or loopback")
