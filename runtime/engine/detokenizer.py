"""Incremental detokenization with stop strings.

Text is streamed as soon as it is valid UTF-8 (tokenizers' DecodeStream holds back partial
characters), except a tail that could still grow into a stop string: that is held until it
either completes the stop (and is cut) or stops matching (and is sent). Stops are matched by one
automaton over the new characters only (``stop_matcher.py``): bounded work per token.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from conveyor.runtime.engine.stop_matcher import StopMatcher
from conveyor.scheduler import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: SamplingParams, matcher: StopMatcher | None = None) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        if matcher is None and params.stop:
            matcher = StopMatcher.for_stops(tuple(params.stop))
        self._matcher = matcher
        self._state = 0
        self._include_stop = params.include_stop_str_in_output
        self.text = ""
        self._sent = 0

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any (text is cut there)."""
        piece = self._stream.step(self._backend, token_id) or ""
        if not piece:
            return None
        start = len(self.text)
        self.text += piece
        if self._matcher is None:
            return None
        self._state, end, i = self._matcher.feed(self._state, piece)
        if i < 0:
            return None
        stop = self._matcher.stops[i]
        at = start + end - len(stop)
        self.text = self.text[: at + len(stop)] if self._include_stop else self.text[:at]
        return stop

    def take_new_text(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._stop_prefix_len()
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent : end], end
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        return self._matcher.depth[self._state] if self._matcher is not None else 0
