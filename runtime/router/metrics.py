"""The router's /metrics: its own series, then every worker's, scraped and labelled ``worker="URL"``.

Aggregated rather than linked: one scrape target covers the deployment, including workers that
``--launch`` started on ports nobody chose, and a dashboard can sum or split by ``worker``. Each
router scrape fans out to the workers at once with a bounded timeout; a worker that does not
answer in time is left out of that scrape and shows as ``conveyor:router_worker_scrape_ok 0``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from conveyor.runtime.router.policy import REASONS
from conveyor.runtime.router.workers import Worker

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("ok", "client_error", "server_error", "client_disconnect", "upstream_error")


class _WorkerStateCollector(Collector):
    """In-flight and health, read from the workers' records at scrape time (nothing to keep in sync)."""

    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("conveyor:router_in_flight", "Requests sent to a worker and not yet ended.",
                                      labels=["worker", "role"])
        healthy = GaugeMetricFamily("conveyor:router_worker_healthy", "1 while the worker takes requests.",
                                    labels=["worker", "role"])
        for w in self.workers():
            in_flight.add_metric([w.url, w.role], w.in_flight)
            healthy.add_metric([w.url, w.role], 1.0 if w.healthy else 0.0)
        yield in_flight
        yield healthy


class RouterMetrics:
    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("conveyor:router_requests", "Requests relayed, by worker and outcome.",
                                ["worker", "outcome"], registry=r)
        self.decisions = Counter("conveyor:router_routing_decisions", "Routing decisions by role and reason.",
                                 ["role", "reason"], registry=r)
        self.retries = Counter("conveyor:router_retries", "Requests resent elsewhere after a refused connection.",
                               ["worker"], registry=r)
        self.no_worker = Counter("conveyor:router_no_worker", "Requests answered 503: no healthy worker of a role.",
                                 ["role"], registry=r)
        self.health_changes = Counter("conveyor:router_worker_health_changes",
                                      "Workers taken out (healthy=0) or put back (healthy=1).",
                                      ["worker", "healthy"], registry=r)
        r.register(_WorkerStateCollector(workers))
        for reason in REASONS:  # present from the start, so rate() has a first point
            for role in {w.role for w in workers()}:
                self.decisions.labels(role, reason)

    def render_own(self) -> bytes:
        return generate_latest(self.registry)


async def scrape_workers(session: aiohttp.ClientSession, workers: Sequence[Worker], timeout: float) -> bytes:
    """Every worker's /metrics, merged per family and relabelled; unanswered workers are left out."""

    async def one(w: Worker) -> str | None:
        try:
            async with session.get(w.url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    texts = await asyncio.gather(*(one(w) for w in workers))
    families: dict[str, Metric] = {}
    ok = GaugeMetricFamily("conveyor:router_worker_scrape_ok", "1 when the worker's /metrics answered this scrape.",
                           labels=["worker"])
    for w, text in zip(workers, texts, strict=True):
        ok.add_metric([w.url], 0.0 if text is None else 1.0)
        if text is None:
            continue
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:  # not Prometheus text: say so through scrape_ok, keep the rest
            ok.samples[-1] = ok.samples[-1]._replace(value=0.0)
            continue
        for fam in parsed:
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(Sample(s.name, {**s.labels, "worker": w.url}, s.value, s.timestamp, s.exemplar)
                                  for s in fam.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([ok, *families.values()]))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
