"""The NIXL transport (UCX backend): DRAM on a CPU box, VRAM between GPUs, RDMA across nodes.

``nixl_cu12`` (the ``pd`` extra, CPU) or ``nixl_cu13`` (the GPU machine's build) provide the same
API. Keep ``tcp`` in ``UCX_TLS``: with shared memory alone UCX has no peer-failure handler, and a
dead peer must give ``NIXL_ERR_REMOTE_DISCONNECT`` at once. The progress thread stays on (without
it WRITEs stall). VRAM pools refuse to start if UCX would move them over TCP (vLLM #52607: 0.5 GB/s).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Sequence
from typing import Any

import structlog

from conveyor.runtime.disagg.transport import Desc, TransportError, XferState
from conveyor.runtime.engine.executor import KVRegion

log = structlog.get_logger("conveyor.disagg")

SELFTEST_BYTES = 64 << 20
VRAM_MIN_GBS = 20.0  # TCP emulation measured 0.5 GB/s on the H200; cuda_ipc 1180 GB/s
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
        gbs = None if os.environ.get("CONVEYOR_PD_SKIP_SELFTEST") == "1" else self._selftest(region)
        self.agent.register_memory([(region.addr, region.nbytes, region.device_id, "")], region.mem)
        self._regions.append(region)
        self._mem = region.mem
        log.info("kv transport ready", transport="nixl", module=self._module, agent=self.name, mem=region.mem,
                 pool_mib=round(region.nbytes / 2**20, 1), ucx_tls=lane, selftest_gbs=gbs)

    def _selftest(self, region: KVRegion) -> float:
        """WRITE 64 MiB between two scratch buffers on the pool's device through this agent itself,
        timed: the lane UCX chose, as a number. VRAM below VRAM_MIN_GBS went through the host (TCP)."""
        import torch

        device = f"cuda:{region.device_id}" if region.mem == "VRAM" else "cpu"
        src = torch.ones(SELFTEST_BYTES, dtype=torch.uint8, device=device)
        dst = torch.zeros_like(src)
        descs = [(t.data_ptr(), t.numel(), region.device_id, "") for t in (src, dst)]
        regs = self.agent.register_memory(descs, region.mem)
        try:
            me = self.name  # a transfer to this agent itself
            loc = self.agent.get_xfer_descs([(src.data_ptr(), src.numel(), region.device_id)], region.mem)
            rem = self.agent.get_xfer_descs([(dst.data_ptr(), dst.numel(), region.device_id)], region.mem)
            best = float("inf")
            for _ in range(3):
                handle = self.agent.initialize_xfer("WRITE", loc, rem, me)
                t0 = time.perf_counter()
                state = self.agent.transfer(handle)
                while state == "PROC":
                    state = self.agent.check_xfer_state(handle)
                best = min(best, time.perf_counter() - t0)
                self.agent.release_xfer_handle(handle)
                if state != "DONE":
                    raise TransportError(f"the NIXL self-test WRITE on {region.mem} failed")
            if not bool(dst[-1].item() == 1):
                raise TransportError("the NIXL self-test WRITE reported done but moved nothing")
        finally:
            self.agent.deregister_memory(regs)
        gbs = SELFTEST_BYTES / best / 1e9
        if region.mem == "VRAM" and gbs < VRAM_MIN_GBS:
            raise TransportError(
                f"NIXL moves VRAM at {gbs:.1f} GB/s: UCX resolved it to TCP or host copies (vLLM #52607). Give "
                f"UCX its CUDA lanes (UCX_TLS=cuda_ipc,cuda_copy,tcp on one node; rc across nodes) or set "
                f"CONVEYOR_PD_SKIP_SELFTEST=1 to run slow anyway")
        return round(gbs, 2)

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
