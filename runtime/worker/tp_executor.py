"""Tensor parallelism's executor on rank 0: the local executor over rank 0's shard, plus the other ranks.

``start_tensor_parallel`` starts ranks 1..N-1 as child processes (runtime/worker/tp_worker.py),
joins the process group with them (NCCL on CUDA, gloo on CPU) and builds rank 0's ``Worker``
while they build theirs. ``TensorParallelExecutor`` then does what the local executor does and,
at each launch, first writes the batch into the shared-memory ring every other rank reads, so
they prepare and launch it too; the collectives inside the forward keep the ranks in step.

A rank that exits, a ring or collective that fails, or any error once a batch went out fails
the engine (``TensorParallelError`` is an ``EngineFatalError``): the ranks' collectives can no longer
be matched, so no step is retried. Every wait on another rank is bounded by polling the ranks'
liveness; the ranks are killed when the engine fails or closes, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import structlog
import torch
import torch.distributed as dist

import conveyor
from conveyor.memory import SwapOp
from conveyor.model import ModelSource
from conveyor.model.config import ModelConfigError
from conveyor.model.parallel import TensorParallel, check_shardable
from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.core import EngineFatalError
from conveyor.runtime.engine.executor import BatchResult
from conveyor.runtime.worker import tp_wire
from conveyor.runtime.worker.executors import CpuExecutor, CudaExecutor, Launched, make_executor
from conveyor.runtime.worker.shm_ring import RingWriter, poll_until
from conveyor.runtime.worker.tp_worker import RankSpec, join_group, rank_config
from conveyor.runtime.worker.worker import Worker, resolve_device
from conveyor.scheduler import SamplingParams, ScheduledBatch

log = structlog.get_logger("conveyor.tp")

# Startup (imports, weights, graph capture) and every collective are bounded by this; a dead rank
# is noticed far sooner, by its exit.
TIMEOUT_S = float(os.environ.get("CONVEYOR_TP_TIMEOUT_S", "600"))
STOP_GRACE_S = 10.0
WAIT_SLEEP_S = 5e-5  # the longest sleep between polls of a batch's end: the read-back latency it may add
SETTLE_S = 1.0  # a failed collective usually means a rank died: how long to look for its exit
RING_SLOTS = 8
RING_SLOT_BYTES = 1 << 20


class TensorParallelError(EngineFatalError):
    """A tensor-parallel rank died or the group fell out of step: the engine cannot go on."""


class RankProcesses:
    """Ranks 1..N-1 as child processes: started, watched (one thread each, blocked in ``wait``), stopped."""

    def __init__(self, specs: list[RankSpec]) -> None:
        self.dead: str | None = None  # why the group is broken, once it is
        self._stopping = False
        # The children import this very checkout of conveyor, wherever the parent was started from.
        root = str(Path(conveyor.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "conveyor.runtime.worker.tp_worker",
                              msgspec.json.encode(spec).decode()], env=env)
            for spec in specs
        ]
        self.pids = [p.pid for p in self.procs]
        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"conveyor-tp-watch-{rank}",
                             daemon=True).start()

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if not self._stopping and self.dead is None:
            self.dead = f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}"
            log.error("tensor-parallel rank died", rank=rank, pid=proc.pid, code=code)

    def alive(self) -> bool:
        return self.dead is None

    def settle(self, within_s: float) -> None:
        """After a collective failed: give a rank that is exiting (the likely cause) time to be seen."""
        deadline = time.monotonic() + within_s
        while self.dead is None and time.monotonic() < deadline:
            for rank, proc in enumerate(self.procs, start=1):
                if (code := proc.poll()) is not None and self.dead is None:
                    self.dead = f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}"
            time.sleep(0.01)

    def stop(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for the ranks to exit on their own, then kill those left."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Prepared(NamedTuple):
    local: Any  # the local executor's prepared batch
    payload: bytes  # the batch as the other ranks receive it
    tables: dict[int, tuple[int, ...]]  # the page tables it leaves them with


class TensorParallelExecutor:
    """Rank 0's executor of a tensor-parallel group; the ``Executor`` protocol over ``local``."""

    def __init__(self, local: CpuExecutor | CudaExecutor, ranks: RankProcesses, ring: RingWriter,
                 store: dist.Store) -> None:
        self.local = local
        self.worker: Worker = local.worker
        self.kv_layout = local.kv_layout
        self.kv_region = None  # each rank holds a slice of the heads: no one region to lend a KV transport
        self.ranks = ranks
        self.ring = ring
        self._pages = tp_wire.PageTableSender(self.worker.kv_pool.page_size)
        self._closed = False
        self.store = store  # the group's rendezvous lives as long as the group
        atexit.register(self._release)

    # -- the protocol ------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> _Prepared:
        self._check()
        local = self.local.prepare(batch)
        return _Prepared(local, *self._pages.encode(batch))

    def launch(self, prepared: _Prepared) -> Launched:
        self._check()
        try:  # the other ranks get it first: their host work overlaps rank 0's
            self.ring.write(prepared.payload, self.ranks.alive)
            self._pages.commit(prepared.tables)  # only a batch that went out changes what the ranks hold
            return self.local.launch(prepared.local)
        except Exception as e:
            raise self._fail(e) from e

    def wait(self, launched: Launched) -> BatchResult:
        self._check()
        try:
            # Polled, not blocked on: a rank that died leaves NCCL waiting forever, and must be noticed.
            poll_until(lambda: self.local.ready(launched), self.ranks.alive, "a tensor-parallel batch", WAIT_SLEEP_S)
            return self.local.wait(launched)
        except Exception as e:
            raise self._fail(e) from e

    def fill_grammar_mask(self, launched: Launched) -> float | None:
        return self.local.fill_grammar_mask(launched)  # rank 0 samples: the other ranks never see masks

    def run_swaps(self, ops: tuple[SwapOp, ...]) -> None:
        self._send(tp_wire.SwapsMsg(tp_wire.encode_swaps(ops)), lambda: self.local.run_swaps(ops))

    def drop_swapped(self) -> None:
        self._send(tp_wire.DropSwappedMsg(), self.local.drop_swapped)

    def check_sampling_params(self, params: SamplingParams) -> None:
        self.local.check_sampling_params(params)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        healthy = self.ranks.alive()
        if healthy:
            try:
                self.ring.write(tp_wire.encode(tp_wire.CloseMsg()), self.ranks.alive)
            except Exception:
                healthy = False
        self.ranks.stop(STOP_GRACE_S if healthy else 0.0)  # killed ranks fail rank 0's pending collectives
        self.local.close()
        self._release()
        # gloo tears down without its peers; NCCL, after a rank died, may block in a hung kernel's
        # teardown: that group is left to the process's exit.
        if dist.is_initialized() and (healthy or self.worker.device.type == "cpu"):
            dist.destroy_process_group()

    # -- failure -----------------------------------------------------------------------------
    def _send(self, msg: tp_wire.Message, then: Callable[[], None]) -> None:
        """Send ``msg`` to the other ranks, then do the same here (any failure: the ranks diverged)."""
        self._check()
        try:
            self.ring.write(tp_wire.encode(msg), self.ranks.alive)
            then()
        except Exception as e:
            raise self._fail(e) from e

    def _check(self) -> None:
        if not self.ranks.alive():
            raise self._fail(None)

    def _fail(self, error: Exception | None) -> TensorParallelError:
        if isinstance(error, TensorParallelError):
            return error
        self.ranks.settle(SETTLE_S)
        reason = self.ranks.dead or f"tensor-parallel step failed: {error!r}"
        self.ranks.dead = reason
        self.ranks.stop()  # the group cannot be resynchronised: free the devices, unblock rank 0's collectives
        return TensorParallelError(reason)

    def _release(self) -> None:
        """Kill the ranks and free the ring (idempotent: close, and interpreter exit)."""
        if self.ring is None:
            return
        self.ranks.stop()
        self.ring.close()
        self.ring = None  # type: ignore[assignment]
        atexit.unregister(self._release)


def start_tensor_parallel(config: EngineConfig, source: ModelSource, max_model_len: int, output_vocab: int,
                          eos_token_ids: tuple[int, ...]) -> TensorParallelExecutor:
    """Start ranks 1..N-1, join the group with them and build rank 0's worker and executor."""
    size = config.tensor_parallel_size
    try:
        check_shardable(source.config, size)
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    device = resolve_device(config)
    if device.type == "cuda":
        first = device.index or 0
        if torch.cuda.device_count() < first + size:
            raise ConfigError(f"tensor_parallel_size {size} needs GPUs {first}..{first + size - 1}, but "
                              f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_device(first)  # the collectives run on the compute thread's current device
    if dist.is_initialized():
        raise ConfigError("a tensor-parallel engine is already running in this process; close it first")
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timedelta(seconds=TIMEOUT_S),
                          wait_for_workers=False)
    ring = RingWriter(size - 1, RING_SLOTS, RING_SLOT_BYTES)
    specs = [RankSpec(config=config, rank=r, store_port=store.port, ring_name=ring.name, ring_slots=RING_SLOTS,
                      ring_slot_bytes=RING_SLOT_BYTES, max_model_len=max_model_len, output_vocab=output_vocab,
                      eos_token_ids=eos_token_ids, parent_pid=os.getpid(), timeout_s=TIMEOUT_S,
                      log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower())
             for r in range(1, size)]
    ranks = RankProcesses(specs)
    try:
        _join(config, store, ranks)
        worker = Worker(rank_config(config, 0), source, max_model_len, output_vocab, eos_token_ids,
                        tp=TensorParallel(0, size))
        local = make_executor(worker)
    except BaseException:
        ranks.stop()
        ring.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    log.info("tensor-parallel group ready", size=size, pids=ranks.pids)
    return TensorParallelExecutor(local, ranks, ring, store)


def _join(config: EngineConfig, store: dist.Store, ranks: RankProcesses) -> None:
    """``join_group`` for rank 0, giving up as soon as a rank dies instead of at the store's timeout."""
    error: list[BaseException] = []

    def join() -> None:
        try:
            join_group(rank_config(config, 0), 0, store, TIMEOUT_S)
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=join, name="conveyor-tp-join", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.05)
        if not ranks.alive():
            raise TensorParallelError(f"{ranks.dead} while the group was starting")
    if error:
        raise error[0]
