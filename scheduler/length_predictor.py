"""Online output-length predictor for SJF/SRTF, learned from finished requests.

Model: a linear regression on log(1 + output length) over hashed sparse features, trained by
normalised least mean squares (one step per finished request, stable for any feature count).
Features: a bias, the log2 bucket of the prompt length, the log2 bucket of max_tokens, the
tenant, hashed prompt prefixes of 1, 2, 4, 8 and 16 tokens (a system prompt or task template is
what usually tells a short answer from a long one, at whatever length it is shared), and hashed
bigrams of the first ``max_ngram_tokens`` tokens. Pure Python, no downloads.

Ranking quality is what SJF needs, so it reports Kendall's tau-b between the prediction made
when a request arrived and its actual length, over a window of recent finishes.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections import deque
from collections.abc import Sequence

from scheduler.request import Request

PREFIX_LENGTHS = (1, 2, 4, 8, 16)


class LengthPredictor:
    def __init__(self, num_features: int = 1 << 14, prior_tokens: float = 128.0, learning_rate: float = 0.5,
                 max_ngram_tokens: int = 256, window: int = 256) -> None:
        self.num_features = num_features
        self.learning_rate = learning_rate
        self.max_ngram_tokens = max_ngram_tokens
        self.weights = [0.0] * num_features
        self.bias = math.log1p(prior_tokens)  # before any finish, every request looks the same
        self.num_observed = 0
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)  # (predicted at arrival, actual)
        self._tau: tuple[int, float] = (0, 0.0)  # (num_observed it was computed at, tau)

    # -- features -------------------------------------------------------------------------
    def _slot(self, text: str) -> int:
        # crc32, not hash(): str hashes are salted per process, and a model must be reproducible.
        return zlib.crc32(text.encode()) % self.num_features

    def features(self, request: Request) -> list[tuple[int, float]]:
        """Sparse (index, value) pairs; bigrams share one unit of weight so long prompts do not dominate."""
        feats = [
            (self._slot(f"plen:{request.num_prompt_tokens.bit_length()}"), 1.0),
            (self._slot(f"maxnew:{request.max_new_tokens.bit_length()}"), 1.0),
            (self._slot(f"tenant:{request.tenant or ''}"), 1.0),
        ]
        ids = request.prompt_token_ids
        # hash() of an int tuple is not salted, so these are reproducible across processes.
        feats.extend((hash((n, *ids[:n])) % self.num_features, 1.0) for n in PREFIX_LENGTHS if len(ids) >= n)
        head = ids[: self.max_ngram_tokens]
        pairs = list(itertools.pairwise(head)) or [tuple(head)]
        grams = {hash(p) % self.num_features for p in pairs if p}
        if grams:
            v = 1.0 / math.sqrt(len(grams))
            feats.extend((g, v) for g in grams)
        return feats

    # -- predict and learn ----------------------------------------------------------------
    def _raw(self, feats: Sequence[tuple[int, float]]) -> float:
        return self.bias + sum(self.weights[i] * v for i, v in feats)

    def predict(self, request: Request) -> float:
        """Predicted total output tokens, never above what the request may generate."""
        return min(float(request.max_new_tokens), max(1.0, math.expm1(self._raw(self.features(request)))))

    def observe(self, request: Request, actual: int, predicted: float | None = None) -> None:
        """Learn from a finished request; ``predicted`` is what was said at arrival (for tau)."""
        if predicted is None:
            predicted = self.predict(request)
        self.recent.append((predicted, actual))
        feats = self.features(request)
        err = math.log1p(actual) - self._raw(feats)
        norm = 1.0 + sum(v * v for _, v in feats)  # the bias counts as a feature of value 1
        step = self.learning_rate * err / norm
        self.bias += step
        for i, v in feats:
            self.weights[i] += step * v
        self.num_observed += 1

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
