"""Engine output deltas -> OpenAI bodies: a full response, or one SSE chunk per delta.

One renderer per HTTP request keeps each choice's running state (text so far, finish, logprobs),
so the streaming and the non-streaming paths share one piece of code per endpoint.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgspec

from runtime.outputs import RequestOutput, SampleLogprobs
from runtime.server.inputs import Plan
from runtime.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse, PromptTokensDetails,
    TokenLogprobEntry, TopLogprob, Usage,
)


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    num_chars: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    completion_logprobs: CompletionLogprobs | None = None
    chat_logprobs: list[TokenLogprobEntry] | None = None


def sse(body: msgspec.Struct | bytes) -> bytes:
    payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return b"data: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Renderer:
    def __init__(self, plan: Plan, model: str, tokenizer: Any | None) -> None:
        self.plan = plan
        self.id = plan.response_id
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.choices = [ChoiceState() for _ in plan.requests]

    def usage(self) -> Usage:
        completion = sum(c.num_output_tokens for c in self.choices)
        # n > 1: a prompt counts once, as it was first computed (its copies then hit the cache).
        first: dict[tuple[int, ...], int] = {}
        for req, c in zip(self.plan.requests, self.choices):
            key = tuple(req.prompt_token_ids)
            first[key] = min(first.get(key, c.num_cached_tokens), c.num_cached_tokens)
        cached = sum(first.values())
        return Usage(prompt_tokens=self.plan.num_prompt_tokens, completion_tokens=completion,
                     total_tokens=self.plan.num_prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def update(self, i: int, out: RequestOutput) -> ChoiceState:
        state = self.choices[i]
        state.text.append(out.text)
        state.num_chars += len(out.text)
        state.num_output_tokens = out.num_output_tokens
        state.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            state.finish_reason, state.stop_reason, state.error = out.finish_reason, out.stop_reason, out.error
        return state

    def has_news(self, out: RequestOutput) -> bool:
        """A delta worth a chunk: the detokenizer may hold text back (partial UTF-8, a possible stop)."""
        return bool(out.text) or out.finished or (self.plan.logprobs and bool(out.logprobs))

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"  # vLLM's spelling for models served without a tokenizer
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """The token's own bytes: one token of a multi-token emoji is a piece of a UTF-8 sequence,
        which its decoded text (U+FFFD) does not carry."""
        if self.tokenizer is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:  # sentencepiece byte fallback
                    return [int(m.group(1), 16)]
                decoder = _byte_level_decoder()
                if type(self.tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel" and all(
                        c in decoder for c in piece):
                    return [decoder[c] for c in piece]
        return list(text.encode())

    # Endpoint-specific: take a delta, opening chunks, the chunk for a delta, the usage chunk,
    # the full response.
    def add(self, i: int, out: RequestOutput) -> tuple[ChoiceState, Any]:
        raise NotImplementedError

    def opening(self) -> list[msgspec.Struct]:
        return []

    def chunk(self, i: int, out: RequestOutput) -> msgspec.Struct | None:
        raise NotImplementedError

    def usage_chunk(self) -> msgspec.Struct:
        raise NotImplementedError

    def response(self) -> msgspec.Struct:
        raise NotImplementedError


class CompletionRenderer(Renderer):
    def add(self, i: int, out: RequestOutput) -> tuple[ChoiceState, CompletionLogprobs | None]:
        offset = self.choices[i].num_chars
        state = self.update(i, out)
        lp = self._logprobs(out.logprobs, offset) if self.plan.logprobs and out.logprobs else None
        if lp is not None:
            acc = state.completion_logprobs = state.completion_logprobs or CompletionLogprobs()
            acc.tokens += lp.tokens
            acc.token_logprobs += lp.token_logprobs
            acc.top_logprobs += lp.top_logprobs
            acc.text_offset += lp.text_offset
        return state, lp

    def chunk(self, i: int, out: RequestOutput) -> CompletionChunk | None:
        state, lp = self.add(i, out)
        if not self.has_news(out):
            return None
        choice = CompletionChoice(index=i, text=out.text, logprobs=lp, finish_reason=state.finish_reason,
                                  stop_reason=state.stop_reason)
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())

    def response(self) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text="".join(c.text), logprobs=c.completion_logprobs,
                             finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in enumerate(self.choices)
        ]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())

    def _logprobs(self, samples: list[SampleLogprobs], offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for s in samples:
            token = self.token_text(s.token_id)
            lp.tokens.append(token)
            lp.token_logprobs.append(s.logprob)
            lp.top_logprobs.append({self.token_text(t.token_id): t.logprob for t in s.top})
            lp.text_offset.append(offset)
            offset += len(token)
        return lp


class ChatRenderer(Renderer):
    def add(self, i: int, out: RequestOutput) -> tuple[ChoiceState, list[TokenLogprobEntry] | None]:
        state = self.update(i, out)
        entries = [self._entry(s) for s in out.logprobs] if self.plan.logprobs and out.logprobs else None
        if entries is not None:
            state.chat_logprobs = (state.chat_logprobs or []) + entries
        return state, entries

    def opening(self) -> list[ChatCompletionChunk]:
        # OpenAI opens every choice with a role-only delta; some clients key on it.
        return [
            ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
            ])
            for i in range(len(self.choices))
        ]

    def chunk(self, i: int, out: RequestOutput) -> ChatCompletionChunk | None:
        state, entries = self.add(i, out)
        if not self.has_news(out):
            return None
        choice = ChatChunkChoice(
            index=i, delta=ChatDelta(content=out.text or None),
            logprobs=ChatLogprobs(content=entries) if entries is not None else None,
            finish_reason=state.finish_reason, stop_reason=state.stop_reason,
        )
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                   usage=self.usage())

    def response(self) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i, message=AssistantMessage(content="".join(c.text)),
                logprobs=ChatLogprobs(content=c.chat_logprobs) if c.chat_logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            )
            for i, c in enumerate(self.choices)
        ]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self.usage())

    def _entry(self, s: SampleLogprobs) -> TokenLogprobEntry:
        token = self.token_text(s.token_id)
        top = [TopLogprob(token=(t := self.token_text(x.token_id)), logprob=x.logprob,
                          bytes=self.token_bytes(x.token_id, t)) for x in s.top]
        return TokenLogprobEntry(token=token, logprob=s.logprob, bytes=self.token_bytes(s.token_id, token),
                                 top_logprobs=top)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each of the 256 bytes is spelled by one printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = list(bs)
    unprintable = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + unprintable)
            unprintable += 1
    return {chr(c): b for b, c in zip(bs, cs)}
