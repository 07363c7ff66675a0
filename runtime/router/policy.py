"""Which worker gets a request: prefix-aware while loads are balanced, least load otherwise.

sgl-router's ``cache_aware`` policy: the loads (in-flight requests) are imbalanced when both
``max - min > balance_abs`` and ``max > balance_rel * min``; then the least loaded worker wins,
whatever it has cached, so that one hot prefix cannot pile every request onto one worker. While
balanced, the worker whose tree matches the largest share of the prompt wins if that share is
above ``cache_threshold``; below it the prompt is new everywhere, and the least loaded worker
takes it (ties: the smallest tree, i.e. the most room to cache it; sgl-router picks the smallest
tree outright). The chosen worker's tree then remembers the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import msgspec

from conveyor.runtime.router.workers import Worker

Reason = Literal["prefix_hit", "least_load", "imbalance"]
REASONS: tuple[Reason, ...] = ("prefix_hit", "least_load", "imbalance")


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True):
    cache_threshold: float = 0.5  # share of the prompt that must match for a prefix hit
    balance_abs: int = 32  # in-flight difference that can count as imbalance ...
    balance_rel: float = 1.5  # ... when the busiest also has this many times the idlest's load
    max_tree_chars: int = 1 << 22  # per worker; ~4 M characters, roughly 1 M tokens of prompts

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be in [0, 1]")
        if self.balance_abs < 0:
            raise ValueError("balance_abs must be >= 0")
        if self.balance_rel < 1.0:
            raise ValueError("balance_rel must be >= 1")
        if self.max_tree_chars < 1:
            raise ValueError("max_tree_chars must be >= 1")


class Choice(NamedTuple):
    worker: Worker
    reason: Reason
    matched: int  # characters of the key the chosen worker had seen


class CacheAwarePolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def choose(self, candidates: Sequence[Worker], key: str) -> Choice:
        """``candidates``: healthy workers, in registration order (the tie-break); never empty."""
        if not candidates:
            raise ValueError("no candidates")
        loads = [w.in_flight for w in candidates]
        hi, lo = max(loads), min(loads)
        cfg = self.config
        if hi - lo > cfg.balance_abs and hi > cfg.balance_rel * lo:
            choice = Choice(self._least_loaded(candidates), "imbalance", 0)
        else:
            matches = [w.tree.match(key) if key else 0 for w in candidates]
            best = max(range(len(candidates)), key=lambda i: (matches[i], -loads[i]))
            if key and matches[best] / len(key) > cfg.cache_threshold:
                choice = Choice(candidates[best], "prefix_hit", matches[best])
            else:
                worker = self._least_loaded(candidates)
                choice = Choice(worker, "least_load", matches[candidates.index(worker)])
        if key:
            choice.worker.tree.insert(key)
        return choice

    @staticmethod
    def _least_loaded(candidates: Sequence[Worker]) -> Worker:
        return min(candidates, key=lambda w: (w.in_flight, w.tree.size))
