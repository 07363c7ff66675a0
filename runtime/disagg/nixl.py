"""The NIXL transport (UCX backend): DRAM on a CPU box, VRAM between GPUs, RDMA across nodes.

``nixl_cu12`` (the ``pd`` extra, CPU) or ``nixl_cu13`` (the GPU machine's build) provide the same
API. Keep ``tcp`` in ``UCX_TLS``: with shared memory alone UCX has no peer-failure handler, and a
dead peer must give ``NIXL_ERR_REMOTE_DISCONNECT`` at once. The progress thread stays on (without
it WRITEs stall).

A WRITE costs per descriptor: NIXL posts one ``ucp_put_nbx`` each, and UCX's ``cuda_ipc`` turns each into
its own ``cuMemcpyDtoDAsync`` + ``cuEventRecord`` (UCX ``src/uct/cuda/cuda_ipc/cuda_ipc_ep.c``), so many small
pages move far below the lane's bandwidth. Two NIXL switches attack that cost without touching the pool's
layout, both per agent (``NixlTransport(sgl=..., threads=...)``):

- ``sgl`` (on by default here, off by NIXL's): NIXL's scatter-gather WRITE (``NIXL_UCX_SGL_ENABLE``): the
  whole list in one ``ucp_put_nbx`` with ``ucp_dt_make_sgl()``, which UCX 1.23 (bundled with NIXL 1.5.1)
  hands ``cuda_ipc`` as one ``cuMemcpyBatchAsync`` (built for CUDA 13; elsewhere UCX emulates it).
- ``threads``: the UCX backend's ``num_threads`` thread pool (vLLM's NixlConnector uses 4): a WRITE of
  ``split_batch_size`` (1,024) descriptors or more is split across that many dedicated UCX workers.

``scripts/bench_disagg.py --transfer-only`` measures each (the README has the H200's numbers). VRAM pools
refuse to start if ``UCX_TLS`` leaves them no CUDA lane, and the first large WRITE to each peer is timed
and logged (an error if VRAM crawls through the host: vLLM #52607).
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

LANE_PROBE_BYTES = 16 << 20  # a WRITE this large shows the lane's bandwidth, not its latency
# ... when its descriptors are this large on average: thousands of small pages are bound by the
# per-descriptor cost (~5-13 us on cuda_ipc), which no lane setting changes.
LANE_PROBE_DESC_BYTES = 256 << 10
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


SGL_ENV = "NIXL_UCX_SGL_ENABLE"  # NIXL reads it when the UCX backend is created
# On: faster on the H200 for every case bench_disagg --transfer-only measures, byte for byte the same.
SGL_DEFAULT = True


def sgl_wanted(sgl: bool | None) -> bool:
    """Whether this agent takes the scatter-gather WRITE: ``sgl`` if given, else the environment's
    ``NIXL_UCX_SGL_ENABLE`` (NIXL's own switch, honoured as NIXL parses it), else ``SGL_DEFAULT``."""
    if sgl is not None:
        return sgl
    env = os.environ.get(SGL_ENV)
    if env is None:
        return SGL_DEFAULT
    return env.strip().lower() in ("y", "yes", "on", "1", "true", "enable")


class NixlTransport:
    def __init__(self, name: str, *, sgl: bool | None = None, threads: int = 0) -> None:
        nixl = _nixl()
        self._module = nixl.__name__
        self.name = name
        self.sgl = sgl_wanted(sgl)
        self.threads = threads
        cfg = nixl.nixl_agent_config(enable_prog_thread=True, backends=["UCX"], num_threads=threads)
        before = os.environ.get(SGL_ENV)
        os.environ[SGL_ENV] = "1" if self.sgl else "0"  # read once, by the UCX backend this agent creates
        try:
            self.agent = nixl.nixl_agent(name, cfg)
        finally:
            if before is None:
                del os.environ[SGL_ENV]
            else:
                os.environ[SGL_ENV] = before
        if "UCX" not in self.agent.backends:
            raise TransportError("NIXL has no UCX backend on this machine")
        self._regions: list[KVRegion] = []
        self._mem = "DRAM"
        self._peer_mem: dict[str, str] = {}
        self._probes: dict[int, tuple[str, int, float]] = {}  # handle -> (peer, bytes, posted at)
        self._lane_gbs: dict[str, float] = {}

    def register(self, region: KVRegion) -> None:
        lane = ucx_lane(region.mem)
        self.agent.register_memory([(region.addr, region.nbytes, region.device_id, "")], region.mem)
        self._regions.append(region)
        self._mem = region.mem
        log.info("kv transport ready", transport="nixl", module=self._module, agent=self.name, mem=region.mem,
                 pool_mib=round(region.nbytes / 2**20, 1), ucx_tls=lane, sgl=self.sgl, threads=self.threads)

    def _timed(self, handle: Any, peer: str, nbytes: int, ndescs: int, t0: float) -> None:
        """The lane as a number: the first WRITE to each peer of LANE_PROBE_BYTES or more, in descriptors
        of LANE_PROBE_DESC_BYTES or more on average, is timed. A self-test at start cannot stand in for
        it: UCX serves a transfer to the same process by other lanes (0.4 GB/s to itself on the H200)."""
        if nbytes >= LANE_PROBE_BYTES and nbytes >= ndescs * LANE_PROBE_DESC_BYTES and peer not in self._lane_gbs:
            self._probes[id(handle)] = (peer, nbytes, t0)

    def _probe_done(self, handle: Any) -> None:
        peer, nbytes, t0 = self._probes.pop(id(handle))
        gbs = nbytes / (time.perf_counter() - t0) / 1e9  # an upper bound on the time: polls are not instant
        self._lane_gbs[peer] = gbs
        if self._mem == "VRAM" and gbs < VRAM_MIN_GBS:
            log.error("NIXL moves VRAM through the host: UCX resolved the lane to TCP or host copies (vLLM #52607); "
                      "give UCX its CUDA lanes (UCX_TLS=cuda_ipc,cuda_copy,tcp on one node; rc across nodes)",
                      peer=peer, gbs=round(gbs, 2), mib=round(nbytes / 2**20, 1))
        else:
            log.info("kv lane measured", peer=peer, gbs=round(gbs, 2), mib=round(nbytes / 2**20, 1), mem=self._mem)

    @property
    def lane_gbs(self) -> dict[str, float]:
        """GB/s of each peer's first large WRITE (see ``_timed``)."""
        return dict(self._lane_gbs)

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
        t0 = time.perf_counter()
        handle = None
        try:
            loc = self.agent.get_xfer_descs(list(local), self._mem)
            rem = self.agent.get_xfer_descs(list(remote), self._mem)
            handle = self.agent.initialize_xfer("WRITE", loc, rem, peer, notif)
            state = self.agent.transfer(handle)
        except Exception as e:  # NIXL_ERR_REMOTE_DISCONNECT and friends raise here
            if handle is not None:
                self.cancel(handle)
            raise TransportError(f"NIXL WRITE to {peer} failed: {e}") from e
        if state == "ERR":
            self.cancel(handle)
            raise TransportError(f"NIXL WRITE to {peer} failed at post")
        self._timed(handle, peer, sum(d[1] for d in local), len(local), t0)
        return handle

    def poll(self, handle: Any) -> XferState:
        try:
            state = self.agent.check_xfer_state(handle)
        except Exception:
            return XferState.ERROR
        result = {"DONE": XferState.DONE, "PROC": XferState.PENDING}.get(state, XferState.ERROR)
        if result is not XferState.PENDING and id(handle) in self._probes:
            if result is XferState.DONE:
                self._probe_done(handle)
            else:
                del self._probes[id(handle)]
        return result

    def cancel(self, handle: Any) -> None:
        self._probes.pop(id(handle), None)
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
