"""The engine core: builds the model, memory and scheduler from an EngineConfig and runs steps.

One step (pipeline depth 1): schedule -> prepare -> launch -> read back -> process outputs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import structlog
import torch

from memory import KVCacheManager, KVPool, PinnedStaging, SwapSpace, TokenPool, make_reservation
from memory.kv_swapper import KVSwapper
from model import load_model, resolve_model
from model.attention import AttentionBackend, TorchPagedAttention
from model.tokenizer import load_tokenizer
from runtime.config import ConfigError, EngineConfig
from runtime.executor import CpuExecutor, CudaExecutor, Launched
from runtime.input_processor import InputProcessor
from runtime.model_runner import ModelRunner, staging_regions
from runtime.output_processor import OutputProcessor
from runtime.outputs import RequestOutput, SampleLogprobs, TokenLogprob
from runtime.predictor_store import load_predictor, save_predictor
from runtime.step_stats import StepRecord
from scheduler import (
    FinishReason,
    PoolWrite,
    Request,
    SamplingParams,
    ScheduledBatch,
    ScheduledSeq,
    Scheduler,
    SchedulerLimits,
    make_policy,
)

if TYPE_CHECKING:
    from model.attention.flashinfer_backend import FlashInferAttention

log = structlog.get_logger("conveyor.engine")

CPU_KV_CACHE_BYTES = 1 << 30
MAX_GRAPH_BATCH = 512
# Rows per GEMM in batch-invariant mode: one tile covers a decode step of up to 256 sequences; a
# larger tile wastes more on small batches, a smaller one launches more GEMMs per prefill.
BATCH_INVARIANT_TILE = 256
STALL_POLL_S = 0.002  # how long a caller waits after a step the policy stalled on purpose


def _logprobs(lp: tuple[list[float], list[list[int]], list[list[float]]] | None) -> list[SampleLogprobs] | None:
    if lp is None:
        return None
    sampled, top_ids, top_values = lp
    return [
        SampleLogprobs(token_id=-1, logprob=v, top=[TokenLogprob(i, x) for i, x in zip(ids, vals)])
        for v, ids, vals in zip(sampled, top_ids, top_values)
    ]


class _InFlight(NamedTuple):
    batch: ScheduledBatch
    launched: Launched
    schedule: tuple[float, float]
    prepare: tuple[float, float]
    launch: tuple[float, float]
    busy: bool  # work was under way when this batch was scheduled


class _SyncDebug:
    """torch.cuda.set_sync_debug_mode("error") for the launch path: any hidden host sync raises."""

    def __enter__(self) -> None:
        self._old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode(self._old)


class EngineStats(NamedTuple):
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV pages owned by requests
    num_preemptions: int  # since start
    device_busy_s: float  # since start: the device (or CPU worker) ran batches
    device_idle_s: float  # since start: idle between two batches while work was queued
    policy_metrics: dict[str, float]  # the scheduling policy's own numbers (e.g. predictor tau)
    num_retractions: int  # preemptions because the KV pool ran dry
    reservation_beta: float  # share of max_tokens promised at admission now
    kv_pages_total: int
    kv_pages_used: int  # held by requests (private) or locked by them in the prefix cache
    kv_pages_promised: int  # used + promised at admission but not grown into yet
    kv_pages_cached: int  # owned by the prefix cache (locked or evictable)
    prefill_tokens: int  # prompt/recompute tokens computed since start
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache since start
    num_swapped_out: int  # retracted requests whose KV went to host memory
    num_swapped_in: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        total = self.prefill_tokens + self.prefix_hit_tokens
        return self.prefix_hit_tokens / total if total else 0.0

    @property
    def device_idle_fraction(self) -> float:
        total = self.device_busy_s + self.device_idle_s
        return self.device_idle_s / total if total else 0.0


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        source = resolve_model(config.model, config.load_format)
        mcfg = source.config
        self.model_config = mcfg
        self.model_name = config.served_model_name or source.name
        max_len = config.max_model_len or mcfg.max_position_embeddings
        if max_len > mcfg.max_position_embeddings:
            raise ConfigError(f"max_model_len {max_len} exceeds the model's {mcfg.max_position_embeddings} positions")
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_len:
            raise ConfigError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        self.max_model_len = max_len

        torch.manual_seed(config.seed)
        self.model = load_model(source, self.dtype, self.device, config.seed)
        self.model.init_kernels(max_len + 1, linear_tile=BATCH_INVARIANT_TILE if config.batch_invariant else None)
        tokenizer_dir = config.tokenizer or source.tokenizer_dir
        self.tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        if self.tokenizer is not None:
            if len(self.tokenizer) > mcfg.vocab_size:
                raise ConfigError(f"tokenizer {tokenizer_dir} has {len(self.tokenizer)} tokens, more than the "
                                  f"model's vocabulary of {mcfg.vocab_size}")
            self.model.output_vocab = len(self.tokenizer)

        backend = self._make_attention_backend()
        self.kv_pool = KVPool.from_budget(
            self._kv_budget(backend), mcfg.num_layers, config.block_size, mcfg.num_kv_heads, mcfg.head_dim,
            self.dtype, self.device,
        )
        if self.kv_pool.usable_pages * config.block_size < max_len:
            raise ConfigError(
                f"the KV pool holds {self.kv_pool.usable_pages * config.block_size} tokens, fewer than "
                f"max_model_len {max_len}; lower --max-model-len or give the KV cache more memory"
            )
        kv = KVCacheManager(
            self.kv_pool.usable_pages, config.block_size,
            make_reservation(config.reservation, config.reservation_beta, config.reservation_adapt),
            first_page=KVPool.RESERVED_PAGES, enable_prefix_caching=config.enable_prefix_caching,
        )
        limits = SchedulerLimits(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        policy = make_policy(
            config.schedule_policy, priority_aging_s=config.priority_aging_s,
            static_batch_size=config.static_batch_size, static_batch_timeout=config.static_batch_timeout,
            round_robin_time_slice=config.round_robin_time_slice, tenant_weights=config.tenant_weights,
        )
        self._predictor = getattr(policy, "predictor", None)  # sjf, srtf and adaptive learn lengths
        self._predictor_path = Path(config.length_predictor_path) if config.length_predictor_path else None
        if self._predictor_path is not None:
            if self._predictor is None:
                raise ConfigError(f"--length-predictor-path needs a policy that predicts lengths (sjf, srtf, "
                                  f"adaptive), not {config.schedule_policy}")
            if self._predictor_path.exists():
                load_predictor(self._predictor, self._predictor_path)
        swap = None
        if config.preemption_mode == "swap":
            swap = SwapSpace(int(config.swap_space * 2**30) // self.kv_pool.page_bytes)
        self.scheduler = Scheduler(limits, policy, kv, swap=swap)
        poison = os.environ.get("CONVEYOR_DEBUG_POISON") == "1"
        self.token_pool = TokenPool(config.max_num_seqs, max_len, self.device, poison=poison)
        staging = PinnedStaging(
            staging_regions(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                            -(-max_len // config.block_size) + 1),
            config.pipeline_depth + 1, self.device,
        )
        self.runner = ModelRunner(self.model, self.kv_pool, self.token_pool, backend, staging, self.device, config.seed)
        if swap is not None:
            self.runner.swapper = KVSwapper(self.kv_pool)
        if self._uses_graphs:
            from runtime.cuda_graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.model, self.kv_pool, self.token_pool, staging,
                                              min(config.max_num_seqs, MAX_GRAPH_BATCH), backend.workspace,
                                              batch_invariant=config.batch_invariant)
            max_pieces = min(config.max_piecewise_tokens, config.max_num_batched_tokens)
            if max_pieces > 0:
                from runtime.piecewise_graphs import PiecewiseGraphs

                self.runner.pieces = PiecewiseGraphs(self.model, self.kv_pool, self.token_pool, staging, max_pieces)
        self.pipeline_depth = config.pipeline_depth
        self.executor: CpuExecutor | CudaExecutor = (
            CudaExecutor(self.runner, self.device, config.max_num_seqs, config.pipeline_depth)
            if self.device.type == "cuda" else CpuExecutor(self.runner)
        )
        self._in_flight: deque[_InFlight] = deque()
        self.stalled = False
        self._last_device_end = 0.0
        self._device_busy_s = 0.0
        self._device_idle_s = 0.0
        self._debug_sync = self.device.type == "cuda" and os.environ.get("CONVEYOR_DEBUG_SYNC") == "1"
        self._debug_checks = os.environ.get("CONVEYOR_DEBUG_CHECKS") == "1"  # integrity after every step
        eos = set(mcfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.outputs = OutputProcessor(self.scheduler, self.tokenizer, tuple(sorted(eos)))
        self.inputs = InputProcessor(self.tokenizer, max_len, self.model.output_vocab)
        self.step_records: list[StepRecord] | None = None  # set to [] to record every step
        self.step_observers: list[Callable[[int], None]] = []  # told each finished batch's token count (metrics)
        log.info(
            "engine ready", model=self.model_name, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            kv_pages=self.kv_pool.usable_pages, block_size=config.block_size, max_model_len=max_len,
        )

    @property
    def _uses_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager

    def _make_attention_backend(self) -> TorchPagedAttention | FlashInferAttention:
        mcfg = self.model_config
        if self.device.type == "cuda":
            from model.attention.flashinfer_backend import FlashInferAttention

            return FlashInferAttention(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, self.config.block_size,
                                       self.device, batch_invariant=self.config.batch_invariant)
        return TorchPagedAttention(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim)

    def _kv_budget(self, backend: AttentionBackend) -> int:
        cfg = self.config
        if cfg.kv_cache_memory is not None:
            return cfg.kv_cache_memory
        if self.device.type == "cpu":
            return CPU_KV_CACHE_BYTES
        peak = self._profile_forward(backend)
        free, total = torch.cuda.mem_get_info(self.device)
        graphs = 0
        if self._uses_graphs:
            from runtime.cuda_graphs import capture_sizes

            # Each captured graph keeps its own fp32 logits output alive.
            graphs = sum(capture_sizes(min(cfg.max_num_seqs, MAX_GRAPH_BATCH))) * self.model.output_vocab * 4 + (256 << 20)
        budget = int(total * cfg.gpu_memory_utilization) - (total - free) - peak - graphs
        log.info("kv budget", total_gib=round(total / 2**30, 1), used_gib=round((total - free) / 2**30, 2),
                 activation_peak_gib=round(peak / 2**30, 2), graphs_gib=round(graphs / 2**30, 2),
                 kv_gib=round(budget / 2**30, 2))
        return budget

    def _profile_forward(self, backend: AttentionBackend) -> int:
        """Peak bytes one full-budget prefill step allocates beyond what is already held."""
        cfg, mcfg = self.config, self.model_config
        tokens = min(cfg.max_num_batched_tokens, self.max_model_len - 1)
        pages = -(-tokens // cfg.block_size) + KVPool.RESERVED_PAGES
        kv = KVPool(mcfg.num_layers, pages, cfg.block_size, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device)
        pool = TokenPool(1, tokens, self.device)
        staging = PinnedStaging(staging_regions(tokens, 1, pages), 1, self.device)
        runner = ModelRunner(self.model, kv, pool, backend, staging, self.device)
        req = Request("profile", [0] * tokens, SamplingParams(max_tokens=1), 1)
        seq = ScheduledSeq(req, slot=0, start=0, num_tokens=tokens, samples=True,
                           pages=tuple(range(KVPool.RESERVED_PAGES, pages)), sample_index=0, epoch=0)
        batch = ScheduledBatch(-1, (seq,), 0, (PoolWrite(0, 0, tuple(req.prompt_token_ids)),), ())
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.execute(runner.prepare(batch))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del runner, kv, pool, staging
        torch.cuda.empty_cache()
        return peak

    # -- requests -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.scheduler.add(req)
        self.outputs.track(req)

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
                      error: str | None = None) -> RequestOutput | None:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None  # unknown or already finished: aborting is idempotent
        return self.outputs.abort(req, reason, error)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        kv = sched.kv
        used = kv.total_pages - kv.num_available_pages  # read once: the engine thread may move it
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=sched.num_waiting,
            kv_usage=sched.kv.usage,
            num_preemptions=sched.num_preemptions,
            device_busy_s=self._device_busy_s,
            device_idle_s=self._device_idle_s,
            policy_metrics=sched.policy.metrics(),
            num_retractions=sched.num_retractions,
            reservation_beta=kv.reservation.beta,
            kv_pages_total=kv.total_pages,
            kv_pages_used=used,
            kv_pages_promised=used + kv.num_outstanding_pages,
            kv_pages_cached=kv.num_cached_pages,
            prefill_tokens=sched.num_prefill_tokens,
            prefix_hit_tokens=sched.num_prefix_hit_tokens,
            num_swapped_out=sched.num_swapped_out,
            num_swapped_in=sched.num_swapped_in,
        )

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance the pipeline by one batch.

        Launch the next batch if there is one; then, once ``pipeline_depth`` batches are in flight
        (or nothing new could be launched), wait for the oldest and turn its tokens into outputs.
        Depth 1 is the no-overlap twin: launch, wait, process, repeat.
        """
        clock = time.perf_counter
        t0 = clock()
        # Work was already under way (not a new request waking an idle engine): a device gap
        # before this batch is the pipeline's fault, and counts as idle.
        busy = bool(self._in_flight) or bool(self.scheduler.running)
        batch = self.scheduler.schedule()
        if batch is not None:
            t1 = clock()
            with self._sync_debug():
                prepared = self.runner.prepare(batch)
                t2 = clock()
                launched = self.executor.launch(prepared)
            self._in_flight.append(_InFlight(batch, launched, (t0, t1), (t1, t2), (t2, clock()), busy))
        # Nothing launched and nothing in flight while requests exist: the policy is holding them
        # back on purpose (a static batch filling up). The caller should wait, not spin.
        self.stalled = batch is None and not self._in_flight
        if batch is None and not self._in_flight and (drops := self.scheduler.take_drops()):
            assert self.runner.swapper is not None
            self.runner.swapper.run(drops)  # nothing in flight: the executor is idle
        if not self._in_flight or (batch is not None and len(self._in_flight) < self.pipeline_depth):
            return []
        done = self._in_flight.popleft()
        t3 = clock()
        result = self.executor.wait(done.launched)  # the one host wait of the step, after N+1 launched
        t4 = clock()
        outputs = self.outputs.process(done.batch, result.token_ids, _logprobs(result.logprobs))
        self.scheduler.batch_done(done.batch)
        for observe in self.step_observers:
            observe(done.batch.num_tokens)
        idle = 0.0
        if self._last_device_end and done.busy:
            idle = max(0.0, result.device_start - self._last_device_end)
        self._device_busy_s += result.device_end - result.device_start
        self._device_idle_s += idle
        if self.step_records is not None:
            self.step_records.append(StepRecord.of(
                done.batch, schedule=done.schedule, prepare=done.prepare, launch=done.launch, wait=(t3, t4),
                process=(t4, clock()), device=(result.device_start, result.device_end), device_idle_before=idle,
            ))
        self._last_device_end = result.device_end
        if self._debug_checks:
            self.check_integrity()
        return outputs

    def _sync_debug(self):
        return _SyncDebug() if self._debug_sync else contextlib.nullcontext()

    def close(self) -> None:
        while self._in_flight:  # drain, so no batch is left reading memory we are about to drop
            self.executor.wait(self._in_flight.popleft().launched)
        self.executor.close()
        if self._predictor_path is not None:
            save_predictor(self._predictor, self._predictor_path)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
