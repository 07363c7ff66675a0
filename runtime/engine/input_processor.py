"""The input stage: prompt text, chat messages or token ids -> a validated Request.

Runs in the caller's thread (the server runs it in a worker thread, off its event loop), never
on the engine's launch path. Text longer than ``max_prompt_chars`` cannot fit in the context
whatever it tokenizes to, so it is refused before the tokenizer spends seconds on it.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Sequence

from conveyor.runtime.engine.grammar import GrammarCompiler
from conveyor.runtime.engine.stop_matcher import StopMatcher
from conveyor.scheduler import InvalidRequestError, Request, SamplingParams

Prompt = str | Sequence[int]


class InputProcessor:
    def __init__(self, tokenizer: Any | None, max_model_len: int, vocab_size: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()
        # No token spells more characters than the longest vocabulary entry (byte-level and
        # sentencepiece entries are at least as long as their text), so this many characters
        # are already more than max_model_len tokens.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        self.max_prompt_chars = max_model_len * max(longest, 1)

    @property
    def grammars(self) -> GrammarCompiler:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self._require_tokenizer("response_format"), self.vocab_size,
                                                 self.eos_token_ids)
            return self._grammars

    def token_ids(self, prompt: Prompt | None = None, messages: list[dict[str, Any]] | None = None,
                  chat_options: dict[str, Any] | None = None) -> list[int]:
        """``chat_options``: apply_chat_template's keywords (chat_template, tools, add_generation_prompt,
        continue_final_message, template variables such as enable_thinking)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt or messages")
        if messages is not None:
            return self._chat_ids(messages, chat_options or {})
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt is empty")
            self._check_chars("prompt", len(prompt))
            ids = self._require_tokenizer("prompt").encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise InvalidRequestError("prompt", "token ids must be integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise InvalidRequestError("prompt", "prompt is empty")
        return ids

    def _chat_ids(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> list[int]:
        tok = self._require_tokenizer("messages")
        if not messages:
            raise InvalidRequestError("messages", "messages is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError(f"messages[{i}]", "each message needs a role and a content")
        self._check_chars("messages", sum(len(str(m["content"])) for m in messages))
        try:
            text = tok.apply_chat_template(messages, tokenize=False, **{"add_generation_prompt": True, **options})
        except Exception as e:  # the template itself rejects the conversation (jinja raise_exception)
            raise InvalidRequestError("messages", f"chat template rejected the messages: {e}") from None
        # The template already wrote the special tokens; encoding must not add a second BOS.
        return tok.encode(text, add_special_tokens=False)

    def _check_chars(self, field: str, n: int) -> None:
        if n > self.max_prompt_chars:
            raise InvalidRequestError(field, f"{field} has {n} characters; at most {self.max_prompt_chars} can fit "
                                      f"in the maximum context length of {self.max_model_len} tokens")

    def _require_tokenizer(self, field: str) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError(field, "this model has no tokenizer; send token ids")
        return self.tokenizer

    def make_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        tenant: str | None = None,
    ) -> Request:
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"prompt has {n} tokens; the maximum context length is {self.max_model_len} "
                "and at least one token must be generated"
            )
        max_new = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_new > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({n} tokens) + max_tokens ({max_new}) exceeds the maximum context "
                f"length {self.max_model_len}"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer; this model has none")
        if params.top_k > self.vocab_size:
            raise InvalidRequestError("top_k", f"must be at most the vocabulary size {self.vocab_size}, "
                                      f"got {params.top_k}")
        bad = [t for t in (*params.logit_bias, *params.stop_token_ids) if t >= self.vocab_size]
        if bad:
            field = "logit_bias" if bad[0] in params.logit_bias else "stop_token_ids"
            raise InvalidRequestError(field, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        req = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt_token_ids,
            params=params,
            max_new_tokens=max_new,
            priority=priority,
            tenant=tenant,
            stop_matcher=StopMatcher.for_stops(tuple(params.stop)) if params.stop else None,
        )
        if params.structured is not None:
            if self.tokenizer is None:
                raise InvalidRequestError(params.structured.field, "structured outputs need a tokenizer")
            req.grammar = self.grammars.matcher(params.structured)  # compiled once per spec, cached
        return req
