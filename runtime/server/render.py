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

from conveyor.runtime.engine.outputs import PromptLogprob, RequestOutput, SampleLogprobs
from conveyor.runtime.server.inputs import Plan
from conveyor.runtime.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunction,
    DeltaToolCall,
    PromptLogprobEntry,
    PromptLogprobs,
    PromptTokensDetails,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from conveyor.runtime.server.tools import parse_output, safe_content_prefix


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
    sent_chars: int = 0  # tools, streaming: content already sent
    held_logprobs: list[TokenLogprobEntry] | None = None  # tools, streaming: logprobs of held-back text
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_sent: bool = False


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
        if out.prompt_logprobs is not None and self.plan.prompt_logprobs:
            state.prompt_logprobs = [self._prompt_entry(e) for e in out.prompt_logprobs]
        return state

    def _prompt_entry(self, e: PromptLogprob | None) -> dict[str, PromptLogprobEntry] | None:
        if e is None:
            return None
        entry = {str(e.token_id): PromptLogprobEntry(logprob=e.logprob, rank=e.rank,
                                                     decoded_token=self.token_text(e.token_id))}
        for r, t in enumerate(e.top, 1):
            entry.setdefault(str(t.token_id), PromptLogprobEntry(logprob=t.logprob, rank=r,
                                                                 decoded_token=self.token_text(t.token_id)))
        return entry

    def take_prompt_logprobs(self, state: ChoiceState) -> PromptLogprobs | None:
        """Streaming: the prompt logprobs go out once, on the choice's first chunk that is sent."""
        if state.prompt_logprobs is None or state.prompt_logprobs_sent:
            return None
        state.prompt_logprobs_sent = True
        return state.prompt_logprobs

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
        echo = self.plan.echo[i] if self.plan.echo is not None else ""
        offset = self.choices[i].num_chars + len(echo)  # offsets count the echoed prompt too
        state = self.update(i, out)
        lp = self._logprobs(out.logprobs, offset) if self.plan.logprobs and out.logprobs else None
        if lp is not None and self.plan.echo is not None and out.prompt_logprobs is not None:
            lp = self._echo_logprobs(self.plan.requests[i].prompt_token_ids, out.prompt_logprobs, lp)
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
                                  stop_reason=state.stop_reason, prompt_logprobs=self.take_prompt_logprobs(state))
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                               usage=self.usage() if self.plan.continuous_usage else None)

    def opening(self) -> list[CompletionChunk]:
        if self.plan.echo is None:
            return []
        return [CompletionChunk(id=self.id, created=self.created, model=self.model,
                                choices=[CompletionChoice(index=i, text=text)])
                for i, text in enumerate(self.plan.echo)]

    def usage_chunk(self) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())

    def response(self) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=(self.plan.echo[i] if self.plan.echo else "") + "".join(c.text),
                             logprobs=c.completion_logprobs,
                             finish_reason=c.finish_reason, stop_reason=c.stop_reason, prompt_logprobs=c.prompt_logprobs)
            for i, c in enumerate(self.choices)
        ]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())

    def _echo_logprobs(self, ids: list[int], prompt: list[PromptLogprob | None],
                       output: CompletionLogprobs) -> CompletionLogprobs:
        """The prompt's tokens first (the first has no logprob), then the output's: OpenAI's echo."""
        lp = CompletionLogprobs()
        offset = 0
        for e, tid in zip(prompt, ids):
            token = self.token_text(tid)
            lp.tokens.append(token)
            lp.token_logprobs.append(e.logprob if e is not None else None)
            lp.top_logprobs.append({self.token_text(t.token_id): t.logprob for t in e.top} if e is not None else None)
            lp.text_offset.append(offset)
            offset += len(token)
        lp.tokens += output.tokens
        lp.token_logprobs += output.token_logprobs
        lp.top_logprobs += output.top_logprobs
        lp.text_offset += output.text_offset
        return lp

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
        if self.plan.tools is not None:
            return self._tool_chunk(i, state, out, entries)
        if not self.has_news(out):
            return None
        choice = ChatChunkChoice(
            index=i, delta=ChatDelta(content=out.text or None),
            logprobs=ChatLogprobs(content=entries) if entries is not None else None,
            finish_reason=state.finish_reason, stop_reason=state.stop_reason,
            prompt_logprobs=self.take_prompt_logprobs(state),
        )
        return self._chunk(choice)

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                                   usage=self.usage() if self.plan.continuous_usage else None)

    def _tool_chunk(self, i: int, state: ChoiceState, out: RequestOutput,
                    entries: list[TokenLogprobEntry] | None) -> ChatCompletionChunk | None:
        """Content streams until a tool call may have begun; calls go out whole, once parsed at the end
        (OpenAI's deltas: index, id, type and name, then arguments; here in one delta per call)."""
        tools = self.plan.tools
        assert tools is not None
        if entries:
            state.held_logprobs = (state.held_logprobs or []) + entries
        text = "".join(state.text)
        delta: ChatDelta | None = None
        finish = state.finish_reason
        if out.finished and finish != "error":
            content, calls = parse_output(tools, text)
            if calls:
                delta = ChatDelta(tool_calls=[
                    DeltaToolCall(index=k, id=c.id, type="function",
                                  function=DeltaFunction(name=c.function.name, arguments=c.function.arguments))
                    for k, c in enumerate(calls)])
                finish = "tool_calls" if finish == "stop" else finish
            elif text[state.sent_chars:]:
                delta = ChatDelta(content=text[state.sent_chars:])
        elif tools.choice == "auto":
            upto = safe_content_prefix(text)
            if upto > state.sent_chars:
                delta = ChatDelta(content=text[state.sent_chars:upto])
                state.sent_chars = upto
        if delta is None and not out.finished:
            return None
        lp, state.held_logprobs = state.held_logprobs, None
        return self._chunk(ChatChunkChoice(
            index=i, delta=delta or ChatDelta(), logprobs=ChatLogprobs(content=lp) if lp is not None else None,
            finish_reason=finish, stop_reason=state.stop_reason, prompt_logprobs=self.take_prompt_logprobs(state),
        ))

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                   usage=self.usage())

    def response(self) -> ChatCompletionResponse:
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            message, finish = AssistantMessage(content=text), c.finish_reason
            if self.plan.tools is not None and finish != "error":
                content, calls = parse_output(self.plan.tools, text)
                if calls:
                    message = AssistantMessage(content=content, tool_calls=calls)
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(ChatChoice(
                index=i, message=message,
                logprobs=ChatLogprobs(content=c.chat_logprobs) if c.chat_logprobs is not None else None,
                finish_reason=finish, stop_reason=c.stop_reason, prompt_logprobs=c.prompt_logprobs,
            ))
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
