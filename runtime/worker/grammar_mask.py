"""Structured outputs, the device half: the token bitmask of one launched batch, filled on the host
from its requests' matchers once every earlier batch is processed, then applied in the sampler.

Overlap: a batch's logits do not depend on its grammar rows' previous tokens, only their masks do.
So a batch launches its forward at once; only its sampling waits for the mask (``GrammarBatch.wait``
on CPU, the CUDA executor's deferred sample on GPU). The engine decides when, in one place:
``EngineCore._fill_grammar_masks``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from conveyor.scheduler import ScheduledSeq

MASK_WAIT_S = 120.0  # a sampler waiting longer than this for its mask is a bug, not a slow host
PARALLEL_FILL_ROWS = 16  # from this many grammar rows, xgrammar fills them on its thread pool
_BATCH_MATCHER: Any = None


def _batch_matcher() -> Any:
    global _BATCH_MATCHER
    if _BATCH_MATCHER is None:
        import xgrammar as xgr

        _BATCH_MATCHER = xgr.BatchGrammarMatcher()
    return _BATCH_MATCHER


class GrammarBatch:
    """The token bitmask of one launched batch's sampling rows, filled on the host after launch.

    Rows without a grammar stay all ones (every token allowed).
    """

    def __init__(self, seqs: list[ScheduledSeq], vocab_size: int, pin: bool) -> None:
        self.seqs = seqs  # the batch's sampling seqs, in sampling-row order
        self.rows = [i for i, s in enumerate(seqs) if s.request.grammar is not None]
        words = (vocab_size + 31) // 32
        self.host = torch.full((len(seqs), words), -1, dtype=torch.int32, pin_memory=pin)
        self._filled = threading.Event()
        self.fill_s = 0.0

    @property
    def filled(self) -> bool:
        return self._filled.is_set()

    def fill(self) -> None:
        """Call once every batch launched before this one has been processed."""
        t0 = time.perf_counter()
        matchers, rows = [], []
        for row in self.rows:
            seq = self.seqs[row]
            req = seq.request
            # A row whose request finished, was preempted, or (engine closing) whose earlier
            # tokens were never processed: its sample is dropped, so any mask will do.
            if (req.is_finished or seq.epoch != req.num_preemptions
                    or len(req.output_token_ids) != seq.sample_index or req.grammar.is_terminated()):
                continue
            matchers.append(req.grammar)
            rows.append(row)
        if len(matchers) >= PARALLEL_FILL_ROWS:
            _batch_matcher().batch_fill_next_token_bitmask(matchers, self.host, rows)
        else:
            for m, row in zip(matchers, rows):
                m.fill_next_token_bitmask(self.host, row)
        self.fill_s = time.perf_counter() - t0
        self._filled.set()

    def wait(self, timeout: float = MASK_WAIT_S) -> None:
        if not self._filled.wait(timeout):
            raise RuntimeError(f"grammar mask not filled within {timeout} s")

    def device_mask(self, device: torch.device) -> torch.Tensor:
        return self.host if device.type == "cpu" else self.host.to(device, non_blocking=True)
