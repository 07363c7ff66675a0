"""Public request traces as simulator workloads: load a trace, keep its arrival pattern (time scaled to a
target rate), take its lengths, and build prompts.

Three formats, told apart by their first line (the files in ``../shared/traces``, README there):

- Azure LLM inference 2023 (csv: ``TIMESTAMP`` absolute, ``ContextTokens``, ``GeneratedTokens``);
- ShareGPT lengths (csv: ``num_prefill_tokens``, ``num_decode_tokens``; no arrivals, so Poisson at the rate);
- Mooncake (jsonl: ``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids`` one per 512-token block).

Prompts are random ids, except Mooncake's: every 512-token block becomes ``block_tokens`` ids drawn from
its hash id, so two prompts share ids exactly where their hashes match (a prefix cache sees the trace's
reuse), and ``block_tokens`` is a multiple of the page size so a shared block is whole pages. That is how
a long-context trace is scaled to a small model's context: input lengths scale by ``block_tokens / 512``,
outputs are kept. Whatever still exceeds ``max_model_len`` loses the end of its prompt.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from conveyor.runtime.tools.simulator.workloads import SimRequest

MOONCAKE_BLOCK = 512  # tokens per hash id in the Mooncake release
TRACE_KINDS = ("azure", "sharegpt", "mooncake")


class TraceRow(NamedTuple):
    arrival: float | None  # seconds from the trace's first row; None: the trace has no arrivals
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trace:
    name: str
    kind: str  # one of TRACE_KINDS
    rows: tuple[TraceRow, ...]

    @property
    def has_arrivals(self) -> bool:
        return self.rows[0].arrival is not None

    @property
    def native_rate(self) -> float | None:
        """Requests per second as recorded (None without arrivals)."""
        if not self.has_arrivals or len(self.rows) < 2:
            return None
        span = self.rows[-1].arrival - self.rows[0].arrival  # type: ignore[operator]
        return (len(self.rows) - 1) / span if span > 0 else math.inf

    def unique_blocks(self) -> int:
        return len({h for r in self.rows for h in r.hash_ids})


def _parse_time(text: str) -> float:
    # Azure writes 7 fractional digits; datetime takes at most 6.
    head, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(head).timestamp() + (float("0." + frac) if frac else 0.0)


def load_trace(path: Path, limit: int | None = None, offset: int = 0) -> Trace:
    """Rows ``offset`` to ``offset + limit`` of a trace file, arrivals relative to the first kept row."""
    path = Path(path)
    with path.open() as f:
        first = f.readline()
    rows: list[TraceRow] = []
    end = None if limit is None else offset + limit
    if first.lstrip().startswith("{"):
        kind = "mooncake"
        with path.open() as f:
            for i, line in enumerate(f):
                if i < offset or not line.strip():
                    continue
                if end is not None and i >= end:
                    break
                d = json.loads(line)
                rows.append(TraceRow(d["timestamp"] / 1000.0, int(d["input_length"]), int(d["output_length"]),
                                     tuple(d.get("hash_ids", ()))))
    else:
        header = [h.strip() for h in first.split(",")]
        if "ContextTokens" in header:
            kind = "azure"
        elif "num_prefill_tokens" in header:
            kind = "sharegpt"
        else:
            raise ValueError(f"{path}: unknown trace format (header {first.strip()!r})")
        with path.open() as f:
            for i, d in enumerate(csv.DictReader(f)):
                if i < offset:
                    continue
                if end is not None and i >= end:
                    break
                if kind == "azure":
                    rows.append(TraceRow(_parse_time(d["TIMESTAMP"]), int(d["ContextTokens"]),
                                         int(d["GeneratedTokens"])))
                else:
                    rows.append(TraceRow(None, int(d["num_prefill_tokens"]), int(d["num_decode_tokens"])))
    if not rows:
        raise ValueError(f"{path}: no rows at offset {offset}")
    if rows[0].arrival is not None:
        t0 = min(r.arrival for r in rows)  # type: ignore[type-var]
        rows = sorted((r._replace(arrival=r.arrival - t0) for r in rows), key=lambda r: r.arrival)  # type: ignore
    return Trace(path.stem, kind, tuple(rows))


class TraceOptions(NamedTuple):
    """How trace rows become requests (the same for every policy and load of one run)."""

    max_model_len: int = 8192
    block_size: int = 16
    block_tokens: int = 64  # Mooncake: tokens a 512-token hash block becomes (a multiple of block_size)
    length_scale: float = 1.0  # every prompt and output length times this (a tiny CPU model's context)
    max_tokens_factor: float | None = None  # max_tokens = this x the mean output (None: the row's own length)
    seed: int = 0


def _random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 30000) for _ in range(n)]


def _block_ids(h: int, n: int) -> list[int]:
    rng = random.Random(f"block:{h}")  # a block's ids depend on its hash only: equal hashes, equal ids
    return _random_ids(rng, n)


def scaled_lengths(trace: Trace, opt: TraceOptions) -> list[tuple[int, int]]:
    """(prompt, output) per row after scaling, before the context clip."""
    f = opt.block_tokens / MOONCAKE_BLOCK if trace.kind == "mooncake" else 1.0
    return [(max(1, round(r.prompt_len * f * opt.length_scale)), max(1, round(r.output_len * opt.length_scale)))
            for r in trace.rows]


def to_requests(trace: Trace, rate: float | None, opt: TraceOptions = TraceOptions(), *,
                prefix: str = "", priority: int = 0, tenant: str | None = None) -> list[SimRequest]:
    """The trace's rows as requests arriving at ``rate`` per second on average.

    A trace with arrivals keeps its pattern, time scaled by ``native_rate / rate`` (``None``: as
    recorded); one without gets Poisson arrivals (seeded). ``rate = inf`` sends everything at t = 0.
    """
    if opt.block_tokens % opt.block_size:
        raise ValueError(f"block_tokens {opt.block_tokens} is not a multiple of block_size {opt.block_size}")
    rng = random.Random(f"{opt.seed}:{trace.name}:{prefix}")
    lengths = scaled_lengths(trace, opt)
    mean_out = sum(o for _, o in lengths) / len(lengths)
    if rate is not None and math.isinf(rate):
        arrivals = [0.0] * len(trace.rows)
    elif trace.has_arrivals:
        native = trace.native_rate
        k = 1.0 if rate is None or native is None or math.isinf(native) else native / rate
        arrivals = [r.arrival * k for r in trace.rows]  # type: ignore[operator]
    else:
        if rate is None:
            raise ValueError(f"{trace.name} has no arrivals: give a rate")
        t, arrivals = 0.0, []
        for _ in trace.rows:
            t += rng.expovariate(rate)
            arrivals.append(t)
    out = []
    bf = opt.block_tokens * opt.length_scale
    for i, (row, (p, o), t) in enumerate(zip(trace.rows, lengths, arrivals, strict=True)):
        cap = opt.max_model_len
        o = min(o, cap - 1)
        max_new = o if opt.max_tokens_factor is None else max(o, round(opt.max_tokens_factor * mean_out))
        max_new = min(max_new, cap - 1)
        o = min(o, max_new)
        p = min(p, cap - max_new)  # the end of a too-long prompt goes: the context must hold it and its output
        if row.hash_ids:
            ids: list[int] = []
            for h in row.hash_ids:
                ids += _block_ids(h, max(1, round(bf)))
            ids = ids[:p] if len(ids) >= p else ids + _random_ids(rng, p - len(ids))
        else:
            ids = _random_ids(rng, p)
        out.append(SimRequest(f"{prefix}{i}", t, tuple(ids), o, max_new, priority, tenant))
    return sorted(out, key=lambda r: r.arrival)


def _page_keys(prompt: Sequence[int], page_size: int) -> list[int]:
    """One key per full page that stands for the whole prefix up to it (a radix path), chained so it
    costs one hash per page instead of a tuple of the prefix."""
    keys, key = [], 0
    for k in range(len(prompt) // page_size):
        key = hash((key, tuple(prompt[k * page_size:(k + 1) * page_size])))
        keys.append(key)
    return keys


def prefix_hit_ceiling(workload: Sequence[SimRequest], page_size: int) -> float:
    """The prompt-token hit rate of an infinite prefix cache that keeps every full page it ever saw:
    each request's longest page-aligned prefix already seen, over all prompt tokens. (An engine never
    serves a prompt's last token from the cache, it must compute it to sample; that rounding is counted.)"""
    seen: set[int] = set()
    hit = total = 0
    for r in sorted(workload, key=lambda r: r.arrival):
        total += len(r.prompt)
        keys = _page_keys(r.prompt, page_size)
        can_hit = (len(r.prompt) - 1) // page_size
        matched = 0
        while matched < can_hit and keys[matched] in seen:
            matched += 1
        hit += matched * page_size
        seen.update(keys)
    return hit / total if total else 0.0


def unique_pages(workload: Sequence[SimRequest], page_size: int) -> int:
    """Distinct full pages (as prefix paths) across the workload's prompts: the infinite cache's size."""
    return len({k for r in workload for k in _page_keys(r.prompt, page_size)})
