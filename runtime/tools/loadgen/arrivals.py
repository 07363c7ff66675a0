"""When each request is sent: Poisson or gamma inter-arrival gaps at a rate, or a replayed trace.

All three produce offsets in seconds from the start of a run; the runner waits for each offset
and, under ``--max-concurrency``, also for a free slot (a closed loop when the rate is inf).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Offsets of ``n`` arrivals at ``rate`` requests/s, as vLLM's ``bench serve`` draws them.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): the mean gap stays 1/rate while
    the variance is 1/(rate^2*burstiness). burstiness 1 is exactly Poisson (exponential gaps);
    below 1 arrivals come in bursts, above 1 they are more regular. rate inf sends all at once.
    """
    if n <= 0:
        return []
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be positive, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes at once: a run measures the server, not an idle wait
    return np.cumsum(gaps).tolist()


@dataclass(frozen=True)
class TraceRow:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


# Column names seen in public traces (Azure LLM inference, Mooncake, BurstGPT) and our own.
_TIME = ("arrival_s", "arrival_time", "timestamp", "time")
_PROMPT = ("prompt_tokens", "input_tokens", "input_len", "context_tokens", "request_tokens")
_OUTPUT = ("output_tokens", "output_len", "generated_tokens", "response_tokens")


def _pick(row: dict, names: tuple[str, ...], path: Path, required: bool = True) -> str | None:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    if required:
        raise ValueError(f"{path}: a row lacks a column among {', '.join(names)}: {row}")
    return None


def read_length_rows(path: Path, with_time: bool) -> list[TraceRow]:
    """Rows of a CSV (with a header) or JSONL file: prompt and output tokens, and arrival seconds."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".jsonl", ".json"):
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raw = list(csv.DictReader(text.splitlines()))
    rows = []
    for r in raw:
        t = _pick(r, _TIME, path, required=with_time)
        rows.append(TraceRow(float(t) if t is not None else 0.0, int(float(_pick(r, _PROMPT, path))),
                             int(float(_pick(r, _OUTPUT, path)))))
    if not rows:
        raise ValueError(f"{path}: no rows")
    # The runner waits for offsets in order, so a trace is replayed in arrival order.
    return sorted(rows, key=lambda r: r.arrival_s) if with_time else rows


def trace_offsets(rows: list[TraceRow], speed: float = 1.0) -> list[float]:
    """The trace's arrival times relative to its first, divided by ``speed`` (2 replays twice as fast)."""
    if speed <= 0:
        raise ValueError(f"trace speed must be positive, got {speed}")
    t0 = min(r.arrival_s for r in rows)
    return [(r.arrival_s - t0) / speed for r in rows]
