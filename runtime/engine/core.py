"""The engine loop: schedule batch N+1, launch it, then wait for batch N and turn its ids into outputs.

The engine holds no tensors and imports no model code: it builds the scheduler and page
bookkeeping over the ``KVLayout`` its executor reports, and runs batches through that executor.

A step that raises is recovered from here (``_recover``): if some requests' parameters are to
blame they fail alone and the rest of their batch recomputes; otherwise the batch's requests
fail. Either way every batch that will not be processed lets go of its requests, so their pages
and slots come back. Too many failures in a row (a broken device) raise ``EngineFatalError``.

Disaggregated roles attach ``disagg`` (a ``DisaggRole``, runtime/disagg/role.py): a prefill worker's
half is told of every processed batch (its KV is written then) and pushes those pages; a decode
worker's announces requests admitted into AWAIT_KV and starts them when their KV and first token
arrived. It is polled at the top of every step, on this thread: every transport call happens here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from conveyor.memory import KVCacheManager, SwapSpace, make_reservation
from conveyor.runtime.disagg.role import DisaggRole
from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.executor import BatchResult, Executor
from conveyor.runtime.engine.input_processor import InputProcessor
from conveyor.runtime.engine.output_processor import OutputProcessor
from conveyor.runtime.engine.outputs import RequestOutput, SampleLogprobs, TokenLogprob
from conveyor.runtime.engine.predictor_store import load_predictor, save_predictor
from conveyor.runtime.engine.step_stats import DeviceTime, EngineStats, StepRecord
from conveyor.scheduler import (
    FinishReason,
    Request,
    RequestStatus,
    ScheduledBatch,
    Scheduler,
    SchedulerLimits,
    SchedulingPolicy,
    make_policy,
)

log = structlog.get_logger("conveyor.engine")

STALL_POLL_S = 0.002  # how long a caller waits after a step the policy stalled on purpose
MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row, nobody to blame, before the engine gives up


class EngineFatalError(RuntimeError):
    """The engine cannot go on (steps keep failing, or recovery itself failed)."""


class _BatchFailed(Exception):
    """Launching, reading back or processing ``batch`` raised ``error``."""

    def __init__(self, batch: ScheduledBatch, error: Exception) -> None:
        self.batch, self.error = batch, error


class ModelInfo(NamedTuple):
    """What the engine knows of the model: no weights, only the limits its requests live within."""

    name: str
    vocab_size: int  # ids the model samples from (the tokenizer's size when it is smaller)
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]


def resolve_max_model_len(config: EngineConfig, model: ModelInfo) -> int:
    """The context length requests live within; a ConfigError when the config cannot serve it."""
    max_len = config.max_model_len or model.max_position_embeddings
    if max_len > model.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_len} exceeds the model's {model.max_position_embeddings} positions")
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_len:
        raise ConfigError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
    return max_len


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
    launched: Any  # the executor's handle
    schedule: tuple[float, float]
    prepare: tuple[float, float]
    launch: tuple[float, float]
    busy: bool  # work was under way when this batch was scheduled


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, model: ModelInfo, tokenizer: Any | None = None,
                 *, clock: Callable[[], float] = time.monotonic, policy: SchedulingPolicy | None = None) -> None:
        """``clock`` stamps arrivals, first tokens and finishes and drives time-aware policies (the
        simulator injects its own); ``policy`` replaces the one ``config.schedule_policy`` names."""
        self.config = config
        self.executor = executor
        self.model_info = model
        self.model_name = config.served_model_name or model.name
        self.tokenizer = tokenizer
        self.max_model_len = max_len = resolve_max_model_len(config, model)
        layout = executor.kv_layout
        if layout.num_pages * config.block_size < max_len:
            raise ConfigError(
                f"the KV pool holds {layout.num_pages * config.block_size} tokens, fewer than "
                f"max_model_len {max_len}; lower --max-model-len or give the KV cache more memory"
            )
        kv = KVCacheManager(
            layout.num_pages, config.block_size,
            make_reservation(config.reservation, config.reservation_beta, config.reservation_adapt),
            first_page=layout.first_page, enable_prefix_caching=config.enable_prefix_caching,
        )
        limits = SchedulerLimits(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        if policy is None:
            policy = make_policy(
                config.schedule_policy, clock=clock, priority_aging_s=config.priority_aging_s,
                static_batch_size=config.static_batch_size, static_batch_timeout=config.static_batch_timeout,
                round_robin_time_slice=config.round_robin_time_slice, tenant_weights=config.tenant_weights,
            )
        self._predictor_path = Path(config.length_predictor_path) if config.length_predictor_path else None
        if self._predictor_path is not None:
            if policy.predictor is None:
                raise ConfigError(f"--length-predictor-path needs a policy that predicts lengths (sjf, srtf, "
                                  f"adaptive), not {config.schedule_policy}")
            if self._predictor_path.exists():
                load_predictor(policy.predictor, self._predictor_path)
        swap = None
        if config.preemption_mode == "swap":
            swap = SwapSpace(int(config.swap_space * 2**30) // layout.page_bytes)
        self.scheduler = Scheduler(limits, policy, kv, clock=clock, swap=swap)
        self.pipeline_depth = config.pipeline_depth
        self._in_flight: deque[_InFlight] = deque()
        self.stalled = False
        self.num_step_failures = 0
        self._consecutive_failures = 0
        self.last_progress = time.monotonic()  # a batch launched or processed; read by /health
        self._device = DeviceTime()
        self._debug_checks = os.environ.get("CONVEYOR_DEBUG_CHECKS") == "1"  # integrity after every step
        self.eos_token_ids = model.eos_token_ids
        self.outputs = OutputProcessor(self.scheduler, tokenizer, model.eos_token_ids, clock=clock)
        self.inputs = InputProcessor(tokenizer, max_len, model.vocab_size, model.eos_token_ids)
        self.grammar_mask_s = 0.0  # host time filling structured-output masks, since start
        self.grammar_mask_batches = 0
        self.step_records: list[StepRecord] | None = None  # set to [] to record every step
        self.step_observers: list[Callable[[int], None]] = []  # told each finished batch's token count (metrics)
        self.disagg: DisaggRole | None = None  # set by build_engine for --role prefill|decode

    # -- requests -------------------------------------------------------------------------
    def add_request(self, req: Request) -> RequestOutput | None:
        """Queue a request; returns its error output instead if it cannot be served (it fails alone)."""
        try:
            self.executor.check_sampling_params(req.params)
            if self.disagg is not None:
                self.disagg.check(req)
            elif req.kv_push is not None or req.remote_prefill is not None:
                raise ValueError("a disaggregated request needs --role prefill or decode")
            self.scheduler.add(req)
            if self.disagg is not None:
                self.disagg.add(req)
        except Exception as e:  # the input stage should have refused it: a request built by hand
            log.warning("request refused by the engine", request_id=req.request_id, error=repr(e))
            req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ERROR
            req.finish_time = self.outputs.clock()
            return OutputProcessor.failed(req, f"invalid request: {e}")
        self.outputs.track(req)
        return None

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
                      error: str | None = None) -> RequestOutput | None:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None  # unknown or already finished: aborting is idempotent
        return self.outputs.abort(req, reason, error)

    def stats(self) -> EngineStats:
        return EngineStats.of(self.scheduler, self._device, self.disagg.stats if self.disagg is not None else None)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight) or (self.disagg is not None and self.disagg.busy())

    # -- disaggregation -------------------------------------------------------------------
    def _fail(self, req: Request, error: str) -> list[RequestOutput]:
        return [self.outputs.abort(req, FinishReason.ERROR, error)]

    def _kv_arrived(self, req: Request, token: int, lp: SampleLogprobs | None) -> list[RequestOutput]:
        self.scheduler.kv_arrived(req)
        return [self.outputs.append_remote(req, token, lp)]

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch batch N+1 if there is one; then, if the pipeline is full, wait for batch N.

        Depth 1 is the no-overlap twin: launch, wait, process, repeat.
        """
        early = self.disagg.poll(self._kv_arrived, self._fail) if self.disagg is not None else []
        try:
            launched = self._launch_next()
        except _BatchFailed as f:  # batches launched before this one are sound: they go on
            return early + self._recover(f.error, [f.batch])
        finally:
            if self.disagg is not None:
                self.disagg.after_launch()
        # Nothing launched and nothing in flight while requests exist: the policy is holding them
        # back on purpose (a static batch filling up). The caller should wait, not spin.
        self.stalled = not launched and not self._in_flight
        if self.stalled and (drops := self.scheduler.take_drops()):
            self.executor.run_swaps(drops)  # nothing in flight: the device is idle
        if not self._must_wait(launched):
            return early
        try:
            return early + self._finish_oldest()
        except _BatchFailed as f:  # batches launched after it read its tokens: they are lost too
            return early + self._recover(f.error, [f.batch])

    def _must_wait(self, launched: bool) -> bool:
        """The overlap condition, the one place that decides it: wait for the oldest batch once
        ``pipeline_depth`` batches are in flight, or when nothing new was launched (drain)."""
        return bool(self._in_flight) and (not launched or len(self._in_flight) >= self.pipeline_depth)

    def _launch_next(self) -> bool:
        clock = time.perf_counter
        t0 = clock()
        # Work was already under way (not a new request waking an idle engine): a device gap
        # before this batch is the pipeline's fault, and counts as idle.
        busy = bool(self._in_flight) or bool(self.scheduler.running)
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        t1 = clock()
        try:
            prepared = self.executor.prepare(batch)
            t2 = clock()
            launched = self.executor.launch(prepared)
        except Exception as e:
            raise _BatchFailed(batch, e) from e
        self._in_flight.append(_InFlight(batch, launched, (t0, t1), (t1, t2), (t2, clock()), busy))
        self.last_progress = time.monotonic()
        self._fill_grammar_masks()  # if nothing was in flight before it, its matchers are current
        return True

    def _finish_oldest(self) -> list[RequestOutput]:
        self._fill_grammar_masks()  # a no-op unless a failed step skipped it: never wait on an unfilled mask
        done = self._in_flight.popleft()
        t3 = time.perf_counter()
        try:
            result = self.executor.wait(done.launched)  # the one host wait of the step, after N+1 launched
        except Exception as e:
            raise _BatchFailed(done.batch, e) from e
        t4 = time.perf_counter()
        try:  # per-request errors are caught inside; this is for a bug in the stage itself
            if result.prompt_logprobs is not None:  # before the samples: a first output carries them
                self.outputs.record_prompt_logprobs(done.batch, result.prompt_logprobs)
            outputs = self.outputs.process(done.batch, result.token_ids, _logprobs(result.logprobs))
        except Exception as e:
            raise _BatchFailed(done.batch, e) from e
        if self.disagg is not None:  # its KV is written: push it before its pages can move
            self.disagg.after_batch(done.batch, outputs)
        self.scheduler.batch_done(done.batch)
        for observe in self.step_observers:
            observe(done.batch.num_tokens)
        self.last_progress = time.monotonic()
        self._consecutive_failures = 0
        self._fill_grammar_masks()
        idle = self._device.add(result.device_start, result.device_end, counts_idle=done.busy)
        if self.step_records is not None:
            self._record(done, result, (t3, t4), idle)
        if self._debug_checks:
            self.check_integrity()
        return outputs

    def recover(self, error: BaseException) -> list[RequestOutput]:
        """After a step raised outside the guarded launch and read-back (a scheduler or output bug):
        nothing in flight will be processed, and every running request is a suspect."""
        return self._recover(error, [])

    def _recover(self, error: BaseException, failed: list[ScheduledBatch]) -> list[RequestOutput]:
        self.num_step_failures += 1
        if isinstance(error, EngineFatalError):  # the executor says the device side is gone (a dead TP rank)
            raise error
        lost = failed + [f.batch for f in self._in_flight]
        for f in self._in_flight:  # let the executor finish with them before their memory moves
            with contextlib.suppress(Exception):
                self.executor.fill_grammar_mask(f.launched)  # a held sampler must not wait forever
                self.executor.wait(f.launched)
        self._in_flight.clear()
        suspects: dict[str, Request] = {}
        for batch in lost:
            suspects.update((s.request.request_id, s.request) for s in batch.seqs if not s.request.is_finished)
        if not failed:
            suspects.update((r.request_id, r) for r in self.scheduler.running)
        blamed = {rid: why for rid, r in suspects.items() if (why := self._blame(r)) is not None}
        outputs: list[RequestOutput] = []
        requeued: list[str] = []
        for rid, req in suspects.items():
            if blamed and rid not in blamed and req.kv_push is None:  # a pushed request is not recomputed
                if req.status is RequestStatus.RUNNING:
                    self.scheduler.requeue(req)  # innocent: recompute, its tokens so far are kept
                    requeued.append(rid)
                continue
            outputs.append(self.outputs.abort(req, FinishReason.ERROR, blamed.get(rid) or f"engine error: {error!r}"))
        if any(batch.swaps for batch in lost):
            self.scheduler.reset_swaps()
            self.executor.drop_swapped()
        for batch in lost:
            self.scheduler.forget_batch(batch)
        # Pages those batches were to fill may already be in the prefix cache, without their KV.
        self.scheduler.kv.drop_cache()
        log.error("engine step failed", error=repr(error), failed=[o.request_id for o in outputs],
                  blamed=sorted(blamed), requeued=requeued, exc_info=error)
        try:
            self.check_integrity()
        except AssertionError as e:
            raise EngineFatalError(f"the engine state is inconsistent after a failed step: {e}") from error
        if not blamed:
            self._consecutive_failures += 1
            if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise EngineFatalError(f"{self._consecutive_failures} steps in a row failed; "
                                       f"last: {error!r}") from error
        self.stalled = False
        self.last_progress = time.monotonic()
        return outputs

    def _blame(self, req: Request) -> str | None:
        """Why this request alone could have failed a batch, if it could."""
        try:
            self.executor.check_sampling_params(req.params)
        except Exception as e:
            return f"invalid sampling parameters: {e!r}"
        return None

    def _fill_grammar_masks(self) -> None:
        """The one place that releases a structured-output batch's sampling.

        A batch with grammar rows launches its forward at once (it needs no token values), but its
        mask needs every earlier token of its requests, so it is filled when the batch becomes the
        oldest in flight: right after the batch before it was read back and its tokens advanced the
        matchers (the sampler, waiting on it, then runs while the engine schedules the next
        batch), or at launch if nothing was in flight. Batches without grammar rows never wait.
        """
        if self._in_flight and (seconds := self.executor.fill_grammar_mask(self._in_flight[0].launched)) is not None:
            self.grammar_mask_s += seconds
            self.grammar_mask_batches += 1

    def _record(self, done: _InFlight, result: BatchResult, wait: tuple[float, float], idle: float) -> None:
        assert self.step_records is not None
        self.step_records.append(StepRecord.of(
            done.batch, schedule=done.schedule, prepare=done.prepare, launch=done.launch, wait=wait,
            process=(wait[1], time.perf_counter()), device=(result.device_start, result.device_end),
            device_idle_before=idle,
        ))

    def close(self) -> None:
        try:
            while self._in_flight:  # drain, so no batch is left reading memory we are about to drop
                self._fill_grammar_masks()  # unprocessed rows get an allow-all mask; nobody reads them
                with contextlib.suppress(EngineFatalError):  # a dead device (a TP rank): nothing left to drain
                    self.executor.wait(self._in_flight.popleft().launched)
            if self.disagg is not None:  # before the pool goes: no transfer may still land in it
                self.disagg.close()
            self.executor.close()
            if self._predictor_path is not None:
                assert self.scheduler.policy.predictor is not None
                save_predictor(self.scheduler.policy.predictor, self._predictor_path)
        finally:
            gc.unfreeze()  # build_engine froze the heap with this engine in it: let its cycles go

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
