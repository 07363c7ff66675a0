"""Online output-length predictor for SJF/SRTF, learned from finished requests.

Model, in log(1 + output length):
- a shrinkage estimate over the prompt's prefixes: the mean over every finished request that
  shared the first 1, 2, 4, ... 32 tokens, each level pulled toward the level below by
  ``prior_count`` pseudo-observations (empirical Bayes). A system prompt or task template is
  what usually tells a short answer from a long one, at whatever length it is shared; a level
  with no finishes yet ends the walk, so a new template falls back to the mean of its shorter
  prefixes and, with none, to the mean of all requests. That mean is itself pulled toward
  ``prior_tokens`` by ``prior_count_all`` pseudo-observations: the first finishes are the short
  requests (survivorship), and a template never seen must not look as short as they are;
- plus a linear correction over a few coarse features (log2 buckets of the prompt length and of
  max_tokens, the tenant), trained by normalised least mean squares at a small rate: on
  workloads where they say nothing they stay near zero instead of adding noise.
Pure Python, no downloads. (Hashed n-grams of the prompt body were tried and dropped: each is
seen once or twice, so they learn noise and cost ~0.05 of tau on the heavy-tail workload.)

Ranking quality is what SJF needs, so it reports Kendall's tau-b between the prediction made
when a request arrived and its actual length, over a window of recent finishes.

What it has learned is a ``PredictorState`` (``state`` / ``load_state``), which the engine writes to
``--length-predictor-path`` when it closes and reads when it starts: a restarted server ranks its
first requests as well as the old one ranked its last. Prefix keys are ``hash()`` of int tuples,
which Python does not salt, so they mean the same in every process.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Sequence

import msgspec

from conveyor.scheduler.request import Request

PREFIX_LENGTHS = (1, 2, 4, 8, 16, 32)


class PredictorState(msgspec.Struct, frozen=True):
    """Everything a ``LengthPredictor`` has learned, as plain data (msgspec encodes it)."""

    num_features: int
    prefix_lengths: tuple[int, ...]
    prefix_stats: list[tuple[int, float, float]]  # (prefix key, finishes, sum of log1p(length))
    total: tuple[float, float]
    weights: dict[int, float]  # the correction's non-zero weights
    recent: list[tuple[float, int]]  # (predicted at arrival, actual): the tau window
    num_observed: int


class LengthPredictor:
    def __init__(self, num_features: int = 1 << 12, prior_tokens: float = 128.0, learning_rate: float = 0.05,
                 prior_count: float = 2.0, prior_count_all: float = 10.0, window: int = 256) -> None:
        self.num_features = num_features
        self.learning_rate = learning_rate
        self.prior_count = prior_count
        self.prior_count_all = prior_count_all
        self.prior = math.log1p(prior_tokens)  # before any finish, every request looks the same
        self.weights = [0.0] * num_features
        self.prefix_stats: dict[int, list[float]] = {}  # prefix key -> [finishes, sum of log1p(length)]
        self.total = [0.0, 0.0]  # the same over all finishes
        self.num_observed = 0
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)  # (predicted at arrival, actual)
        self._tau: tuple[int, float] = (0, 0.0)  # (num_observed it was computed at, tau)

    # -- features -------------------------------------------------------------------------
    def _slot(self, text: str) -> int:
        # crc32, not hash(): str hashes are salted per process, and a model must be reproducible.
        return zlib.crc32(text.encode()) % self.num_features

    def features(self, request: Request) -> list[tuple[int, float]]:
        """The correction's sparse (index, value) pairs."""
        return [
            (self._slot(f"plen:{request.num_prompt_tokens.bit_length()}"), 1.0),
            (self._slot(f"maxnew:{request.max_new_tokens.bit_length()}"), 1.0),
            (self._slot(f"tenant:{request.tenant or ''}"), 1.0),
        ]

    @staticmethod
    def prefix_keys(request: Request) -> list[int]:
        ids = request.prompt_token_ids
        # hash() of an int tuple is not salted, so these are reproducible across processes.
        return [hash((n, *ids[:n])) for n in PREFIX_LENGTHS if len(ids) >= n]

    def _prefix_estimate(self, keys: Sequence[int]) -> float:
        n, s = self.total
        est = (s + self.prior_count_all * self.prior) / (n + self.prior_count_all)
        for key in keys:
            stats = self.prefix_stats.get(key)
            if stats is None:
                break  # longer prefixes are unseen too
            est = (stats[1] + self.prior_count * est) / (stats[0] + self.prior_count)
        return est

    # -- predict and learn ----------------------------------------------------------------
    def _raw(self, request: Request, feats: Sequence[tuple[int, float]]) -> float:
        return self._prefix_estimate(self.prefix_keys(request)) + sum(self.weights[i] * v for i, v in feats)

    def predict(self, request: Request) -> float:
        """Predicted output tokens (about the median), never above what the request may generate."""
        return min(float(request.max_new_tokens), max(1.0, math.expm1(self._raw(request, self.features(request)))))

    def observe(self, request: Request, actual: int, predicted: float | None = None) -> None:
        """Learn from a finished request; ``predicted`` is what was said at arrival (for tau)."""
        if predicted is None:
            predicted = self.predict(request)
        self.recent.append((predicted, actual))
        y = math.log1p(actual)
        feats = self.features(request)
        step = self.learning_rate * (y - self._raw(request, feats)) / (1.0 + len(feats))
        for i, v in feats:
            self.weights[i] += step * v
        for key in self.prefix_keys(request):
            stats = self.prefix_stats.setdefault(key, [0.0, 0.0])
            stats[0] += 1
            stats[1] += y
        self.total[0] += 1
        self.total[1] += y
        self.num_observed += 1

    # -- what it learned ---------------------------------------------------------------------
    def state(self) -> PredictorState:
        return PredictorState(
            self.num_features, PREFIX_LENGTHS, [(k, v[0], v[1]) for k, v in self.prefix_stats.items()],
            (self.total[0], self.total[1]), {i: w for i, w in enumerate(self.weights) if w},
            list(self.recent), self.num_observed)

    def load_state(self, state: PredictorState) -> None:
        """Continue from ``state``; it must come from a predictor with the same features."""
        if state.num_features != self.num_features or tuple(state.prefix_lengths) != PREFIX_LENGTHS:
            raise ValueError(f"predictor state has {state.num_features} features and prefixes "
                             f"{tuple(state.prefix_lengths)}; this predictor has {self.num_features} and "
                             f"{PREFIX_LENGTHS}")
        if any(not 0 <= i < self.num_features for i in state.weights):
            raise ValueError("predictor state has a weight index outside its features")
        self.prefix_stats = {k: [n, total] for k, n, total in state.prefix_stats}
        self.total = list(state.total)
        self.weights = [0.0] * self.num_features
        for i, w in state.weights.items():
            self.weights[i] = w
        self.recent.clear()
        self.recent.extend(state.recent)
        self.num_observed = state.num_observed
        self._tau = (-1, 0.0)

    def kendall_tau(self) -> float:
        """Kendall's tau-b of (predicted at arrival, actual) over the recent window; 0 if undefined.

        Cached until the next finish: /metrics and backpressure read it often, from another thread.
        """
        seen, tau = self._tau
        if seen != self.num_observed:
            pairs = list(self.recent)  # one C-level copy: safe against the engine thread appending
            tau = kendall_tau([p for p, _ in pairs], [a for _, a in pairs])
            self._tau = (self.num_observed, tau)
        return tau

    def metrics(self) -> dict[str, float]:
        return {"length_predictor_kendall_tau": self.kendall_tau(), "length_predictor_samples": len(self.recent)}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Tau-b (ties in either ranking count against neither side); O(n^2), for windows of hundreds."""
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else 0.0
