"""The step-time model: seconds per engine step from its shape, and its least-squares fit to the step
records of a real engine."""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterable
from pathlib import Path

import msgspec
import numpy as np

from conveyor.runtime.engine.step_stats import StepRecord


class CostModel(msgspec.Struct, frozen=True):
    """Seconds per step: ``base_s + per_token_s * tokens + per_kv_token_s * kv_tokens_read``, plus
    ``per_prefill_step_s`` when the step computes any prefill.

    The last term is what a step pays for not being a pure decode: decode-only steps replay one
    CUDA graph, a step with a prompt chunk launches attention eagerly between graph pieces (H100,
    qwen3-0.6b: 5.6 ms against 1.7 ms, whatever the chunk's length), which no per-token cost fits.
    """

    base_s: float = 0.006  # launch + reading the weights once
    per_token_s: float = 2e-5  # compute per query token
    per_kv_token_s: float = 2e-8  # attention reads of KV (StepRecord.kv_tokens_read: sum of KV lengths)
    per_prefill_step_s: float = 0.0  # extra for a step with prefill tokens (eager launches)

    def step_s(self, num_tokens: int, kv_tokens_read: int, prefill: bool = False) -> float:
        return (self.base_s + self.per_token_s * num_tokens + self.per_kv_token_s * kv_tokens_read
                + (self.per_prefill_step_s if prefill else 0.0))

    @property
    def coefficients(self) -> np.ndarray:
        return np.array([self.base_s, self.per_token_s, self.per_kv_token_s, self.per_prefill_step_s])

    @classmethod
    def parse(cls, text: str) -> CostModel:
        try:
            values = [float(x) for x in text.split(",")]
            if len(values) not in (3, 4):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a,b,c[,d] (seconds, s/token, s/kv-token, s/prefill step), got {text!r}") from None
        return cls(*values)

    def r_squared(self, records: Iterable[StepRecord]) -> float:
        x, y = _design(records)
        pred = x @ self.coefficients
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0


def step_seconds(r: StepRecord) -> float:
    """A step's share of the engine's timeline, what the simulator's step stands for: its device time plus
    the device's idle before it while work was queued (the host still preparing it). Idle with nothing to
    run (an arrival gap) is recorded as 0, so it never counts."""
    return r.device[1] - r.device[0] + r.device_idle_before


def _design(records: Iterable[StepRecord]) -> tuple[np.ndarray, np.ndarray]:
    rows = [(1.0, r.num_tokens, r.kv_tokens_read, float(r.num_prefill_tokens > 0), step_seconds(r)) for r in records]
    if not rows:
        raise ValueError("no step records to fit")
    m = np.asarray(rows, dtype=np.float64)
    return m[:, :4], m[:, 4]


def fit_cost_model(records: Iterable[StepRecord]) -> CostModel:
    """Least squares of ``step_seconds`` on (1, num_tokens, kv_tokens_read, has prefill), coefficients >= 0.

    A negative coefficient (e.g. KV reads that a CPU's caches hide) would let a simulated step take
    negative time, so this is non-negative least squares: with four unknowns, the best of the fits
    over every subset of columns whose coefficients all come out non-negative.
    """
    x, y = _design(records)
    n = x.shape[1]
    best: tuple[float, np.ndarray] | None = None
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(n)
        full[cols] = coef
        sse = float(((x @ full - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, full)
    if best is None:  # every subset went negative: durations do not grow with work at all
        return CostModel(max(0.0, float(y.mean())), 0.0, 0.0)
    return CostModel(*(float(v) for v in best[1]))


def save_step_records(records: Iterable[StepRecord], path: Path) -> None:
    """A JSON array of objects keyed by StepRecord's field names (spans as [start, end]); gzip if ``path``
    ends in .gz (a trace run's tens of thousands of steps shrink ~5x)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([r._asdict() for r in records])
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def load_step_records(path: Path) -> list[StepRecord]:
    """What ``save_step_records`` wrote (tuples as 2-element arrays), gzipped or not."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            rows = json.loads(f.read())
    else:
        rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise TypeError(f"{path}: expected a JSON array of step records")
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in StepRecord._fields if f not in row]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}")
        out.append(StepRecord(**{f: tuple(row[f]) if isinstance(row[f], list) else row[f] for f in StepRecord._fields}))
    return out
