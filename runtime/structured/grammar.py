"""Grammar-constrained sampling with xgrammar.

xgrammar over llguidance, by measurement (scripts/bench_structured.py --mask-only: SmolLM2's 49k
vocabulary, an array-of-objects schema with enums and bounded strings, 2 shared CPU cores): mask
fill 0.004 vs 0.09 ms per step at batch 1, 0.15 vs 5.4 ms at batch 64 (each with its thread
pool); xgrammar precomputes the context-independent part of each token mask.

Overlap: a batch's logits do not depend on its grammar rows' previous tokens, only their masks do.
So a batch launches its forward at once; its mask is filled on the host when every batch before it
has been processed (its matchers have seen every earlier token), and only its sampling waits for
that (``GrammarBatch.wait`` on CPU, the CUDA executor's deferred sample on GPU). The engine decides
when in one place: ``EngineCore._fill_grammar_masks``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import structlog
import torch

from model.sampling import apply_token_bitmask  # noqa: F401  (re-exported)
from scheduler import InvalidRequestError, ScheduledSeq, StructuredSpec

log = structlog.get_logger("conveyor.structured")

_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
MASK_WAIT_S = 120.0  # a sampler waiting longer than this for its mask is a bug, not a slow host
_COMPILE_CACHE = 256  # distinct specs kept compiled
PARALLEL_FILL_ROWS = 16  # from this many grammar rows, xgrammar fills them on its thread pool
_BATCH_MATCHER: Any = None


def _batch_matcher() -> Any:
    global _BATCH_MATCHER
    if _BATCH_MATCHER is None:
        import xgrammar as xgr

        _BATCH_MATCHER = xgr.BatchGrammarMatcher()
    return _BATCH_MATCHER


class GrammarCompiler:
    """Spec -> compiled grammar (cached), and a fresh matcher per request.

    Runs in the caller's thread when a request is made, never on the engine's launch path.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()  # the event loop and an offline caller may compile at once
        self.num_compiles = 0

    def compile(self, spec: StructuredSpec) -> Any:
        key = (spec.kind, spec.value)
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                return hit
        t0 = time.perf_counter()
        try:
            compiled = self._compile(spec)
        except InvalidRequestError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with the parser's message
            # xgrammar prefixes "[hh:mm:ss] /path/file.cc:line: "; the client needs the rest.
            message = _XGR_PREFIX.sub("", str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
            raise InvalidRequestError(spec.field, f"invalid {spec.kind.replace('_', ' ')}: {message}") from None
        with self._lock:
            if len(self._cache) >= _COMPILE_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compiled
            self.num_compiles += 1
        log.debug("grammar compiled", kind=spec.kind, ms=round((time.perf_counter() - t0) * 1e3, 2))
        return compiled

    def _compile(self, spec: StructuredSpec) -> Any:
        c = self._compiler
        if spec.kind == "json_object":
            return c.compile_builtin_json_grammar()
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            if not choices or not all(isinstance(x, str) and x for x in choices):
                raise InvalidRequestError(spec.field, "must be a non-empty list of non-empty strings")
            # JSON string literals are valid EBNF string literals (same escapes).
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in choices))
        if spec.kind == "grammar":
            return c.compile_grammar(spec.value)
        if spec.kind == "structural_tag":
            return c.compile_structural_tag(spec.value)
        raise InvalidRequestError(spec.field, f"unknown constraint kind {spec.kind!r}")

    def matcher(self, spec: StructuredSpec) -> Any:
        return self._xgr.GrammarMatcher(self.compile(spec))

    def num_words(self) -> int:
        return (self.vocab_size + 31) // 32


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
