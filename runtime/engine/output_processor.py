"""The output stage: sampled ids -> appended tokens, stop checks, text deltas, finishes.

A request whose output handling raises (its detokenizer, its stop check) fails alone; the rest of
the batch is processed as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from conveyor.runtime.engine.detokenizer import IncrementalDetokenizer
from conveyor.runtime.engine.executor import PromptLogprobRows
from conveyor.runtime.engine.outputs import (
    PromptLogprob,
    RequestOutput,
    SampleLogprobs,
    TokenLogprob,
)
from conveyor.scheduler import FinishReason, Request, ScheduledBatch, Scheduler

log = structlog.get_logger("conveyor.engine")


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer: Any | None, eos_token_ids: tuple[int, ...],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def track(self, req: Request) -> None:
        if self.tokenizer is not None:
            self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.params, req.stop_matcher)

    def process(self, batch: ScheduledBatch, sampled: list[int],
                logprobs: list[SampleLogprobs] | None = None) -> list[RequestOutput]:
        now = self.clock()
        outputs: list[RequestOutput] = []
        sampling_seqs = [s for s in batch.seqs if s.samples]
        assert len(sampling_seqs) == len(sampled), "one sampled id per sampling sequence"
        for row, (seq, token) in enumerate(zip(sampling_seqs, sampled)):
            req = seq.request
            if req.is_finished or seq.epoch != req.num_preemptions:
                continue  # finished or preempted after this batch launched: a zombie sample, dropped
            assert seq.sample_index == len(req.output_token_ids), "samples arrive in launch order"
            lp = None
            if logprobs is not None and (k := req.params.logprobs) is not None:
                lp = SampleLogprobs(token_id=token, logprob=logprobs[row].logprob, top=logprobs[row].top[:k])
            try:
                outputs.append(self._append(req, token, now, lp))
            except Exception as e:
                log.exception("output processing failed; failing the request", request_id=req.request_id)
                error = f"output processing failed: {e!r}"
                failed = self.failed(req, error) if req.is_finished else self.abort(req, FinishReason.ERROR, error)
                outputs.append(failed)
        return outputs

    def append_remote(self, req: Request, token: int, lp: SampleLogprobs | None) -> RequestOutput:
        """A token sampled elsewhere (a prefill worker's first token), appended as if read back here."""
        try:
            return self._append(req, token, self.clock(), lp)
        except Exception as e:
            log.exception("output processing failed; failing the request", request_id=req.request_id)
            error = f"output processing failed: {e!r}"
            return self.failed(req, error) if req.is_finished else self.abort(req, FinishReason.ERROR, error)

    def record_prompt_logprobs(self, batch: ScheduledBatch, rows: PromptLogprobRows) -> None:
        """File each scored prompt position under its request; a position already filled (a recompute
        after preemption scores it again) keeps its first value, which is the same."""
        _, target, rank, top_ids, top_values = rows
        row = 0
        for seq_index, first, count in rows.spans:
            req = batch.seqs[seq_index].request
            if req.is_finished:
                row += count
                continue
            k = req.params.prompt_logprobs or 0
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None] * req.num_prompt_tokens
            for pos in range(first, first + count):
                if req.prompt_logprobs[pos] is None:
                    req.prompt_logprobs[pos] = PromptLogprob(
                        token_id=req.prompt_token_ids[pos], logprob=target[row], rank=rank[row],
                        top=[TokenLogprob(i, v) for i, v in zip(top_ids[row][:k], top_values[row][:k])])
                    req.num_prompt_logprobs += 1
                row += 1

    def _append(self, req: Request, token: int, now: float, lp: SampleLogprobs | None) -> RequestOutput:
        req.output_token_ids.append(token)
        # Only kept tokens advance a matcher (zombie samples never get here). A rejected token means
        # the mask and the matcher disagree: stop the request rather than emit invalid output.
        rejected = req.grammar is not None and not req.grammar.accept_token(token)
        if req.first_token_time is None:
            req.first_token_time = now
        params = req.params
        detok = self._detok.get(req.request_id)
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        error: str | None = None
        if rejected:
            reason, error = FinishReason.ERROR, f"token {token} violates the request's grammar"
        elif token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            reason, stop_reason = FinishReason.STOP, token
        elif detok is not None and (stop := detok.add(token)) is not None:
            reason, stop_reason = FinishReason.STOP, stop
        elif len(req.output_token_ids) >= req.max_new_tokens:
            reason = FinishReason.LENGTH
        text = detok.take_new_text(final=reason is not None) if detok is not None else ""
        if reason is not None:
            self.finish(req, reason, stop_reason, now)
        out = self._output(req, text, [token], reason, stop_reason, error, logprobs=[lp] if lp is not None else None)
        if len(req.output_token_ids) == 1 and req.params.prompt_logprobs is not None:
            # The whole prompt has been computed by the time its first token is sampled.
            prompt_lp = req.prompt_logprobs if req.prompt_logprobs is not None else [None] * req.num_prompt_tokens
            out = msgspec.structs.replace(out, prompt_logprobs=prompt_lp)
        return out

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None,
               now: float | None = None) -> None:
        self.scheduler.finish(req, reason, stop_reason)
        req.finish_time = now if now is not None else self.clock()
        self._detok.pop(req.request_id, None)

    def abort(self, req: Request, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> RequestOutput:
        self.finish(req, reason)
        return self._output(req, "", [], reason, None, error)

    @classmethod
    def failed(cls, req: Request, error: str) -> RequestOutput:
        """The error output of a request that is already out of the scheduler (or never got in)."""
        return cls._output(req, "", [], FinishReason.ERROR, None, error)

    @staticmethod
    def _output(req: Request, text: str, token_ids: list[int], reason: FinishReason | None,
                stop_reason: str | int | None, error: str | None = None,
                logprobs: list[SampleLogprobs] | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            text=text,
            token_ids=token_ids,
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            stop_reason=stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            arrival_time=req.arrival_time,
            scheduled_time=req.admit_time,
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
            error=error,
            logprobs=logprobs,
        )
