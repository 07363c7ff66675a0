"""PNGs of a run (latency CDFs, throughput over time) and of a rate sweep (latency vs rate)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from conveyor.runtime.tools.loadgen.report import RunResult  # noqa: E402


def _cdf(ax, values_s: list[float], title: str) -> None:
    ms = np.sort(np.asarray(values_s, dtype=np.float64) * 1000)
    if ms.size:
        ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post")
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)


def latency_cdfs(res: RunResult, path: Path) -> Path:
    ok = [r for r in res.requests if r.success]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _cdf(axes[0], [r.ttft_s for r in ok if r.ttft_s is not None], "TTFT")
    _cdf(axes[1], [r.tpot_s for r in ok if r.tpot_s is not None], "TPOT")
    _cdf(axes[2], [r.e2e_s for r in ok if r.e2e_s is not None], "E2E latency")
    fig.suptitle(f"{res.model} · {res.workload} · rate {res.request_rate}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def throughput_over_time(res: RunResult, path: Path, bin_s: float = 1.0) -> Path:
    """Output tokens and finished requests per second, in bins of ``bin_s`` from the run's start."""
    token_times, done_times = [], []
    for r in res.requests:
        if not r.success or r.ttft_s is None:
            continue
        # a text chunk is a token here (the client's event unit); the last one ends the request
        token_times.extend(r.start_s + r.ttft_s + np.concatenate([[0.0], np.cumsum(r.itl_s)]))
        done_times.append(r.start_s + (r.e2e_s or r.ttft_s))
    edges = np.arange(0.0, max(res.duration, bin_s) + bin_s, bin_s)
    tokens, _ = np.histogram(token_times, bins=edges)
    done, _ = np.histogram(done_times, bins=edges)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(edges[:-1], tokens / bin_s, label="output tokens/s")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(edges[:-1], done / bin_s, color="tab:orange", label="requests/s")
    ax2.set_ylabel("finished requests/s")
    fig.legend(loc="upper right")
    ax.set_title(f"Throughput over time · {res.model} · rate {res.request_rate}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ms(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]  # a rate where nothing succeeded: a gap


def latency_vs_rate(results: list[RunResult], path: Path) -> Path:
    """One point per swept rate: p50/p99 TTFT and TPOT, and goodput when an SLO was given."""
    rates = [float(r.request_rate) for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        ax.plot(rates, _ms([getattr(r, f"median_{name}_ms") for r in results]), marker="o", label="p50")
        ax.plot(rates, _ms([getattr(r, f"p99_{name}_ms") for r in results]), marker="o", label="p99")
        ax.set_title(f"{title} vs request rate")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(rates, [r.request_throughput for r in results], marker="o", label="throughput")
    if all(r.request_goodput is not None for r in results):
        axes[2].plot(rates, [r.request_goodput for r in results], marker="o", label="goodput")
    axes[2].set_title("completed requests/s vs request rate")
    axes[2].set_xlabel("request rate (req/s)")
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: list[RunResult], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for res in results:
        tag = f"rate{res.request_rate}"
        paths.append(latency_cdfs(res, out_dir / f"latency_cdf_{tag}.png"))
        paths.append(throughput_over_time(res, out_dir / f"throughput_{tag}.png"))
    finite = [r for r in results if r.request_rate != "inf"]
    if len(finite) > 1:
        paths.append(latency_vs_rate(finite, out_dir / "latency_vs_rate.png"))
    return paths
