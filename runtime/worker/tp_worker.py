"""A tensor-parallel worker rank (1..N-1): a process started by rank 0 that runs its shard of every batch.

It joins the group, builds its ``Worker`` (model shard, KV shard, token pool, staging, graphs), then
reads rank 0's messages from the shared-memory ring and, for each batch, prepares it into its own
staging and launches it: forward (the collectives meet rank 0's), then the ids rank 0 sampled
into its token pool. It never waits on a host result, so rank 0's pipeline depth holds for it too.
It exits when rank 0 says close, when a collective fails, or when rank 0 is gone (a watchdog
thread polls the parent pid), so no rank outlives the engine.

Run as ``python -m conveyor.runtime.worker.tp_worker SPEC_JSON`` (rank 0 does this).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import msgspec
import structlog
import torch
import torch.distributed as dist

from conveyor.model import resolve_model
from conveyor.model.parallel import TensorParallel
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.logging import configure_logging
from conveyor.runtime.worker import tp_wire
from conveyor.runtime.worker.shm_ring import RingReader
from conveyor.runtime.worker.tp_runner import ParallelModelRunner
from conveyor.runtime.worker.worker import Worker, resolve_device

log = structlog.get_logger("conveyor.tp")

PARENT_POLL_S = 0.25


class RankSpec(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a worker rank needs from rank 0, passed on its command line."""

    config: EngineConfig
    rank: int
    store_port: int
    ring_name: str
    ring_slots: int
    ring_slot_bytes: int
    max_model_len: int
    output_vocab: int
    eos_token_ids: tuple[int, ...]
    parent_pid: int
    timeout_s: float
    log_level: str = "warning"  # rank 0's; the ranks log to stderr like it, never to stdout


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """Rank ``rank``'s config: on CUDA, the rank-th GPU counting from the one ``--device`` names."""
    device = resolve_device(config)
    if device.type != "cuda":
        return config
    return msgspec.structs.replace(config, device=f"cuda:{(device.index or 0) + rank}")


def join_group(config: EngineConfig, rank: int, store: dist.Store, timeout_s: float) -> TensorParallel:
    """Join the default process group of ``config.tensor_parallel_size`` ranks: NCCL on CUDA, gloo on CPU."""
    device = resolve_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, config.tensor_parallel_size)


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when rank 0 is gone (reparented), whatever the main thread is blocked in."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def serve(worker: Worker, ring: RingReader, parent_alive: Callable[[], bool]) -> None:
    """Run rank 0's messages until it says close."""
    runner = worker.runner
    assert isinstance(runner, ParallelModelRunner)
    keep: deque[object] = deque(maxlen=worker.config.pipeline_depth + 1)  # in-flight batches' inputs
    pages = tp_wire.PageTableReceiver()
    while True:
        msg = tp_wire.decode(ring.read(parent_alive))
        if isinstance(msg, tp_wire.BatchMsg):
            prepared = runner.prepare(pages.decode(msg))
            runner.follow(prepared, runner.forward(prepared))
            keep.append(prepared)
        elif isinstance(msg, tp_wire.SwapsMsg):
            assert runner.swapper is not None, "a swap was sent without a swapper"
            runner.swapper.run(tp_wire.decode_swaps(msg.swaps))
        elif isinstance(msg, tp_wire.DropSwappedMsg):
            if runner.swapper is not None:
                runner.swapper.host.clear()
        else:
            return


def main(argv: list[str] | None = None) -> int:
    spec = msgspec.json.decode((argv or sys.argv[1:])[0], type=RankSpec)
    configure_logging(spec.log_level)
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), name="conveyor-tp-parent", daemon=True).start()
    config = rank_config(spec.config, spec.rank)
    if resolve_device(config).type == "cpu":  # ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    store = dist.TCPStore("127.0.0.1", spec.store_port, config.tensor_parallel_size, is_master=False,
                          timeout=timedelta(seconds=spec.timeout_s))
    tp = join_group(config, spec.rank, store, spec.timeout_s)
    try:
        source = resolve_model(config.model, config.load_format)
        worker = Worker(config, source, spec.max_model_len, spec.output_vocab, spec.eos_token_ids, tp)
        ring = RingReader(spec.ring_name, spec.rank - 1, config.tensor_parallel_size - 1, spec.ring_slots,
                          spec.ring_slot_bytes)
        log.info("tensor-parallel rank ready", rank=spec.rank, device=str(worker.device),
                 kv_pages=worker.kv_layout.num_pages)
        gc.collect()  # as build_engine does for rank 0: a collector pause on any rank stalls them all
        gc.freeze()
        serve(worker, ring, lambda: os.getppid() == spec.parent_pid)
        ring.close()
    except Exception:
        log.exception("tensor-parallel rank failed", rank=spec.rank)
        os._exit(1)  # skip the process group's teardown: it would wait on the ranks we failed
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
