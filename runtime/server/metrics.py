"""Prometheus metrics for one server: request outcomes and latencies, tokens, engine state.

Each app gets its own ``CollectorRegistry`` so that several apps in one process (tests, or a
router in front of several engines) never share or double-register series. Names follow
vLLM's (``vllm:`` -> ``conveyor:``) so existing dashboards need only the prefix changed.
Engine gauges are read when scraped, not pushed per step: the engine thread stays untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield GaugeMetricFamily("conveyor:num_requests_running", "Requests in the running batch.", stats.num_running)
        yield GaugeMetricFamily("conveyor:num_requests_waiting", "Requests waiting for admission.", stats.num_waiting)
        yield GaugeMetricFamily("conveyor:kv_cache_usage_perc", "Fraction of KV pages owned by requests (0-1).",
                                stats.kv_usage)
        yield CounterMetricFamily("conveyor:num_preemptions", "Requests preempted since start.", stats.num_preemptions)
        yield CounterMetricFamily("conveyor:device_busy_seconds", "Time the device ran batches.", stats.device_busy_s)
        yield CounterMetricFamily("conveyor:device_idle_seconds",
                                  "Time the device sat idle between consecutive batches (the overlap gap).",
                                  stats.device_idle_s)
        yield GaugeMetricFamily("conveyor:engine_alive", "1 while the engine loop runs.", int(self.engine.is_alive))
        # KV memory: where the pages are, how bold admission is, what the prefix cache saves.
        pages = GaugeMetricFamily("conveyor:kv_pages", "KV pages by state: total; used (held by requests); "
                                  "promised (used + promised at admission, not grown into yet); cached (prefix "
                                  "cache, locked or evictable).", labels=["state"])
        for state, n in (("total", stats.kv_pages_total), ("used", stats.kv_pages_used),
                         ("promised", stats.kv_pages_promised), ("cached", stats.kv_pages_cached)):
            pages.add_metric([state], n)
        yield pages
        yield GaugeMetricFamily("conveyor:reservation_beta", "Share of max_tokens promised at admission.",
                                stats.reservation_beta)
        yield CounterMetricFamily("conveyor:num_retractions", "Preemptions because the KV pool ran dry.",
                                  stats.num_retractions)
        yield CounterMetricFamily("conveyor:prefix_cache_queries", "Prompt tokens admitted (computed or cached).",
                                  stats.prefill_tokens + stats.prefix_hit_tokens)
        yield CounterMetricFamily("conveyor:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                  stats.prefix_hit_tokens)
        yield CounterMetricFamily("conveyor:num_swapped_out", "Retracted requests whose KV went to host memory.",
                                  stats.num_swapped_out)
        # The scheduling policy's own numbers (SJF's predictor tau, adaptive's switches, fair's
        # counter gap), one gauge each: a policy adds a metric by returning another key.
        for key, value in stats.policy_metrics.items():
            yield GaugeMetricFamily(f"conveyor:{key}", f"Scheduling policy metric {key}.", value)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("conveyor:request_success", "Finished engine requests by finish reason.",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("conveyor:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("conveyor:generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.ttft = Histogram("conveyor:time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("conveyor:time_per_output_token_seconds", "Mean time between output tokens.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("conveyor:e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.http_responses = Counter("conveyor:http_responses", "HTTP responses by status code.",
                                      ["status"], registry=r)
        r.register(_EngineCollector(engine))

    def observe_finished(self, out: RequestOutput) -> None:
        self.requests.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.generation_tokens.inc(out.num_output_tokens)
        if out.finish_time is not None:
            self.e2e.observe(out.finish_time - out.arrival_time)
        if out.first_token_time is not None:
            self.ttft.observe(out.first_token_time - out.arrival_time)
            if out.finish_time is not None and out.num_output_tokens > 1:
                self.tpot.observe((out.finish_time - out.first_token_time) / (out.num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
