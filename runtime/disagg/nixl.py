"""The NIXL transport (UCX backend): DRAM on a CPU box, VRAM between GPUs, RDMA across nodes.

``nixl_cu12`` (the ``pd`` extra, CPU) or ``nixl_cu13`` (the GPU machine's build) provide the same
API. Keep ``tcp`` in ``UCX_TLS``: with shared memory alone UCX has no peer-failure handler, and a
dead peer must give ``NIXL_ERR_REMOTE_DISCONNECT`` at once. The progress thread stays on (without
it WRITEs stall). VRAM pools refuse to start if UCX would move them over TCP (vLLM #52607: 0.5 GB/s).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

import structlog

from conveyor.runtime.disagg.transport import Desc, TransportError, XferState
from conveyor.runtime.engine.executor import KVRegion

log = structlog.get_logger("conveyor.disagg")

_CUDA_TLS = ("cuda_ipc", "cuda_copy", "rc", "dc", "ud", "gdr_copy")  # UCX lanes that move VRAM without the host


def _nixl() -> Any:
    for name in ("nixl_cu13", "nixl_cu12", "nixl"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise TransportError("NIXL is not installed: pip install -e '.[pd]' (nixl-cu12), or the GPU kit's nixl-cu13")


def ucx_lane(mem: str) -> str:
    """The UCX transports this process may use, as UCX_TLS says (``all`` when unset), checked for
    the pool's memory: VRAM whose only lanes are TCP/shared memory would crawl through the host."""
    tls = os.environ.get("UCX_TLS", "all")
    names = [t.strip().lstrip("^") for t in tls.split(",") if t.strip()]
    if mem == "VRAM" and tls != "all" and not tls.startswith("^") and not any(
            n.startswith(_CUDA_TLS) or n in ("cuda", "ib", "rdma") for n in names):
        raise TransportError(f"UCX_TLS={tls!r} leaves VRAM transfers to TCP/host copies (~0.5 GB/s, vLLM #52607); "
                             "add cuda_ipc,cuda_copy (one node) or rc (RDMA), and keep tcp for failure detection")
    if tls != "all" and "tcp" not in names:
        log.warning("UCX_TLS without tcp: a dead peer may not be detected", ucx_tls=tls)
    return tls


class NixlTransport:
    def __init__(self, name: str) -> None:
        nixl = _nixl()
        self._module = nixl.__name__
        self.name = name
        cfg = nixl.nixl_agent_config(enable_prog_thread=True, backends=["UCX"])
        self.agent = nixl.nixl_agent(name, cfg)
        if "UCX" not in self.agent.backends:
            raise TransportError("NIXL has no UCX backend on this machine")
        self._regions: list[KVRegion] = []
        self._mem = "DRAM"
        self._peer_mem: dict[str, str] = {}

    def register(self, region: KVRegion) -> None:
        lane = ucx_lane(region.mem)
        self.agent.register_memory([(region.addr, region.nbytes, region.device_id, "")], region.mem)
        self._regions.append(region)
        self._mem = region.mem
        log.info("kv transport ready", transport="nixl", module=self._module, agent=self.name, mem=region.mem,
                 pool_mib=round(region.nbytes / 2**20, 1), ucx_tls=lane)

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        try:
            peer = self.agent.add_remote_agent(metadata)
        except Exception as e:
            raise TransportError(f"cannot add NIXL peer: {e}") from e
        return peer.decode() if isinstance(peer, bytes) else str(peer)

    def remove_peer(self, peer: str) -> None:
        try:
            self.agent.remove_remote_agent(peer)
        except Exception as e:  # already gone
            log.debug("remove_remote_agent failed", peer=peer, error=repr(e))

    def write(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notif: bytes = b"") -> Any:
        try:
            loc = self.agent.get_xfer_descs(list(local), self._mem)
            rem = self.agent.get_xfer_descs(list(remote), self._mem)
            handle = self.agent.initialize_xfer("WRITE", loc, rem, peer, notif)
            state = self.agent.transfer(handle)
        except Exception as e:  # NIXL_ERR_REMOTE_DISCONNECT and friends raise here
            raise TransportError(f"NIXL WRITE to {peer} failed: {e}") from e
        if state == "ERR":
            self.cancel(handle)
            raise TransportError(f"NIXL WRITE to {peer} failed at post")
        return handle

    def poll(self, handle: Any) -> XferState:
        try:
            state = self.agent.check_xfer_state(handle)
        except Exception:
            return XferState.ERROR
        return {"DONE": XferState.DONE, "PROC": XferState.PENDING}.get(state, XferState.ERROR)

    def cancel(self, handle: Any) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:
            log.debug("release_xfer_handle failed", error=repr(e))

    def notify(self, peer: str, msg: bytes) -> None:
        try:
            self.agent.send_notif(peer, msg)
        except Exception as e:
            raise TransportError(f"NIXL notification to {peer} failed: {e}") from e

    def notifications(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for peer, msgs in self.agent.get_new_notifs().items():
            name = peer.decode() if isinstance(peer, bytes) else str(peer)
            out.extend((name, m) for m in msgs)
        return out

    def close(self) -> None:
        pass  # the agent goes with the process
