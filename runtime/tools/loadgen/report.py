"""Per-request records -> the run's summary, its JSON and the vLLM-style table.

Definitions (as vLLM's ``bench serve``): TTFT is send to first text; ITL every gap between text
chunks; TPOT per request (E2E - TTFT) / (output tokens - 1), only for requests with > 1 output
token; E2E ("e2el") send to last text. Percentiles interpolate linearly (``numpy.percentile``).
Goodput counts the successful requests within every SLO given, per second of the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import msgspec
import numpy as np

from conveyor.runtime.tools.loadgen.client import RequestRecord

PERCENTILES = (90, 95, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def parse_slo(text: str | None) -> dict[str, float]:
    """``ttft_ms=200,tpot_ms=50`` -> {"ttft_ms": 200.0, "tpot_ms": 50.0}."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo: {part!r} is not one of {', '.join(k + '=MS' for k in SLO_KEYS)}")
        slo[key] = float(value)
    return slo


def tpot_s(rec: RequestRecord) -> float | None:
    if rec.ttft_s is None or rec.e2e_s is None or rec.output_tokens <= 1:
        return None
    return (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    if not rec.success:
        return False
    tpot = tpot_s(rec)
    measured = {"ttft_ms": rec.ttft_s, "tpot_ms": tpot if tpot is not None else 0.0, "e2el_ms": rec.e2e_s}
    return all(measured[k] is not None and measured[k] * 1000 <= limit for k, limit in slo.items())


@dataclass(frozen=True)
class Stats:
    mean: float | None
    median: float | None
    std: float | None
    p: dict[int, float | None]


def stats_ms(values_s: list[float]) -> Stats:
    # None, not NaN, when nothing was measured (every request failed; one-token outputs have no
    # TPOT): JSON has no NaN, and a reader must not mistake "no data" for 0 ms.
    if not values_s:
        return Stats(None, None, None, {q: None for q in PERCENTILES})
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    return Stats(float(ms.mean()), float(np.median(ms)), float(ms.std()),
                 {q: float(np.percentile(ms, q)) for q in PERCENTILES})


class RequestResult(msgspec.Struct, kw_only=True):
    """One request as the JSON records it (seconds, like vLLM's per-request lists)."""

    index: int
    start_s: float
    prompt_len: int
    prompt_tokens: int | None
    output_len: int
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    itl_s: list[float]
    status: int
    success: bool
    error: str


class RunResult(msgspec.Struct, kw_only=True):
    """One run at one rate: configuration, summary (vLLM's field names), every request."""

    date: str
    base_url: str
    endpoint: str
    model: str
    model_id: str  # vLLM's name for the same
    workload: str
    request_rate: float | str  # "inf" for all at once, as vLLM writes it
    burstiness: float
    max_concurrency: int | None
    num_prompts: int
    slo: dict[str, float]
    duration: float
    completed: int
    failed: int
    failures_by_status: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float  # vLLM's peak: the most text chunks any one second of the run saw
    max_concurrent_requests: int  # the most requests in flight at once
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    std_ttft_ms: float | None
    p90_ttft_ms: float | None
    p95_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    std_tpot_ms: float | None
    p90_tpot_ms: float | None
    p95_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    std_itl_ms: float | None
    p90_itl_ms: float | None
    p95_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2el_ms: float | None
    median_e2el_ms: float | None
    std_e2el_ms: float | None
    p90_e2el_ms: float | None
    p95_e2el_ms: float | None
    p99_e2el_ms: float | None
    # vLLM's parallel per-request lists, so its plotting scripts read our files too
    input_lens: list[int]
    output_lens: list[int]
    ttfts: list[float | None]
    itls: list[list[float]]
    errors: list[str]
    requests: list[RequestResult]
    generated_texts: list[str] | None = None  # with --save-generated-texts


def failure_key(rec: RequestRecord) -> str:
    if rec.status == 0:
        return "no_response"
    return "stream_error" if rec.status == 200 else str(rec.status)


def peak_output_per_s(records: list[RequestRecord]) -> float:
    """Text chunks (tokens, as ITL counts them) per whole second of the run, at the busiest second."""
    per_second: Counter[int] = Counter()
    for r in records:
        if not r.success or r.ttft_s is None:
            continue
        t = r.start_s + r.ttft_s
        per_second[int(t)] += 1
        for gap in r.itl_s:
            t += gap
            per_second[int(t)] += 1
    return float(max(per_second.values(), default=0))


def peak_concurrency(records: list[RequestRecord]) -> int:
    """The most requests in flight at one instant (send to last byte)."""
    events = sorted(e for r in records for e in ((r.start_s, 1), (r.start_s + (r.e2e_s or 0.0), -1)))
    peak = now = 0
    for _, step in events:  # at equal times -1 sorts first: one ending as another starts is not overlap
        now += step
        peak = max(peak, now)
    return peak


def summarize(records: list[RequestRecord], duration_s: float, slo: dict[str, float], *,
              save_texts: bool = False, **config) -> RunResult:
    """``config``: the RunResult fields that describe the run (date, base_url, ..., num_prompts)."""
    ok = [r for r in records if r.success]
    failures = Counter(failure_key(r) for r in records if not r.success)
    metrics = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [t for r in ok if (t := tpot_s(r)) is not None],
        "itl": [g for r in ok for g in r.itl_s],
        "e2el": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    fields: dict[str, float] = {}
    for name in METRICS:
        s = stats_ms(metrics[name])
        fields |= {f"mean_{name}_ms": s.mean, f"median_{name}_ms": s.median, f"std_{name}_ms": s.std}
        fields |= {f"p{q}_{name}_ms": s.p[q] for q in PERCENTILES}
    inputs = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    goodput = sum(meets_slo(r, slo) for r in records) * per_s if slo else None
    return RunResult(
        **config, model_id=config["model"], slo=slo,
        max_output_tokens_per_s=peak_output_per_s(records), max_concurrent_requests=peak_concurrency(records),
        generated_texts=[r.text for r in records] if save_texts else None, duration=duration_s, completed=len(ok), failed=len(records) - len(ok),
        failures_by_status=dict(sorted(failures.items())), total_input_tokens=inputs, total_output_tokens=outputs,
        request_throughput=len(ok) * per_s, request_goodput=goodput, output_throughput=outputs * per_s,
        total_token_throughput=(inputs + outputs) * per_s, **fields,
        input_lens=[r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in records],
        output_lens=[r.output_tokens for r in records], ttfts=[r.ttft_s for r in records],
        itls=[r.itl_s for r in records], errors=[r.error for r in records],
        requests=[RequestResult(index=r.index, start_s=r.start_s, prompt_len=r.prompt_len,
                                prompt_tokens=r.prompt_tokens, output_len=r.output_len, output_tokens=r.output_tokens,
                                ttft_s=r.ttft_s, tpot_s=tpot_s(r), e2e_s=r.e2e_s, itl_s=r.itl_s, status=r.status,
                                success=r.success, error=r.error) for r in records],
    )


def format_table(res: RunResult) -> str:
    """The summary as vLLM's ``bench serve`` prints it."""
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: object, fmt: str = "") -> None:
        lines.append(f"{label:<44}{value:>16{fmt}}" if value is not None else f"{label:<44}{'n/a':>16}")

    row("Request rate (req/s):", str(res.request_rate))
    row("Max concurrency:", str(res.max_concurrency))
    row("Successful requests:", res.completed)
    row("Failed requests:", res.failed)
    for key, count in res.failures_by_status.items():
        row(f"  failed with {key}:", count)
    row("Benchmark duration (s):", res.duration, ".2f")
    row("Total input tokens:", res.total_input_tokens)
    row("Total generated tokens:", res.total_output_tokens)
    row("Request throughput (req/s):", res.request_throughput, ".2f")
    if res.request_goodput is not None:
        row("Request goodput (req/s):", res.request_goodput, ".2f")
        row("  within SLO:", ",".join(f"{k}={v:g}" for k, v in res.slo.items()))
    row("Output token throughput (tok/s):", res.output_throughput, ".2f")
    row("Total token throughput (tok/s):", res.total_token_throughput, ".2f")
    row("Peak output token throughput (tok/s):", res.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", res.max_concurrent_requests)
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in METRICS:
        lines.append("{s:{c}^60}".format(s=f" {titles[name]} ", c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", getattr(res, f"mean_{name}_ms"), ".2f")
        row(f"Median {upper} (ms):", getattr(res, f"median_{name}_ms"), ".2f")
        for q in PERCENTILES:
            row(f"P{q} {upper} (ms):", getattr(res, f"p{q}_{name}_ms"), ".2f")
    lines.append("=" * 60)
    return "\n".join(lines)
