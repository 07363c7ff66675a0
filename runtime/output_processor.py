"""The output stage: sampled ids -> appended tokens, stop checks, text deltas, finishes."""

from __future__ import annotations

import time
from typing import Any

from runtime.detokenizer import IncrementalDetokenizer
from runtime.outputs import RequestOutput, SampleLogprobs
from scheduler import FinishReason, Request, ScheduledBatch, Scheduler


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer: Any | None, eos_token_ids: tuple[int, ...]) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def track(self, req: Request) -> None:
        if self.tokenizer is not None:
            self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.params)

    def process(self, batch: ScheduledBatch, sampled: list[int],
                logprobs: list[SampleLogprobs] | None = None) -> list[RequestOutput]:
        now = time.monotonic()
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
            outputs.append(self._append(req, token, now, lp))
        return outputs

    def _append(self, req: Request, token: int, now: float, lp: SampleLogprobs | None) -> RequestOutput:
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        params = req.params
        detok = self._detok.get(req.request_id)
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            reason, stop_reason = FinishReason.STOP, token
        elif detok is not None and (stop := detok.add(token)) is not None:
            reason, stop_reason = FinishReason.STOP, stop
        elif len(req.output_token_ids) >= req.max_new_tokens:
            reason = FinishReason.LENGTH
        text = detok.take_new_text(final=reason is not None) if detok is not None else ""
        if reason is not None:
            self.finish(req, reason, stop_reason, now)
        return self._output(req, text, [token], reason, stop_reason, logprobs=[lp] if lp is not None else None)

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None,
               now: float | None = None) -> None:
        self.scheduler.finish(req, reason, stop_reason)
        req.finish_time = now if now is not None else time.monotonic()
        self._detok.pop(req.request_id, None)

    def abort(self, req: Request, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> RequestOutput:
        self.finish(req, reason)
        return self._output(req, "", [], reason, None, error)

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
            scheduled_time=req.scheduled_time,
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
            error=error,
            logprobs=logprobs,
        )
