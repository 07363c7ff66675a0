"""Incremental detokenization with stop strings.

Text is streamed as soon as it is valid UTF-8 (tokenizers' DecodeStream holds back partial
characters), except a tail that could still grow into a stop string: that is held until it
either completes the stop (and is cut) or stops matching (and is sent).
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from conveyor.scheduler import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._sent = 0

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any (text is cut there)."""
        piece = self._stream.step(self._backend, token_id) or ""
        if not piece:
            return None
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += piece
        if not self._stops:
            return None
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return None
        at, stop = min(hits)
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
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
