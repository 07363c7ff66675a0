"""Prometheus metrics for one server: request outcomes and latencies, tokens, engine state, HTTP.

Each app gets its own ``CollectorRegistry`` so that several apps in one process (tests, or a
router in front of several engines) never share or double-register series. Every series carries
``model_name``. What vLLM also measures has vLLM's name and meaning under ``prefix`` (``conveyor``
by default; ``--metrics-prefix vllm`` makes vLLM's stock Grafana dashboard work unchanged); what
only Conveyor measures (device idle, KV page states, reservation beta, policy gauges) is always
``conveyor:``. Engine gauges are read when scraped, not pushed per step: the engine thread stays
untouched, except for one histogram observation per step (``iteration_tokens_total``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.scheduler import Request

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that quantiles from either engine compare.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIXES = ("conveyor", "vllm")
OWN = "conveyor"  # the prefix of series vLLM has no counterpart for


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``: vLLM's buckets for token counts."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _EngineCollector(Collector):
    """Gauges and counters the engine keeps itself, read at scrape time."""

    def __init__(self, engine, prefix: str) -> None:
        self.engine = engine
        self.p = prefix
        self.name = engine.model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        p, labels, values = self.p, ["model_name"], [self.name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge(f"{p}:num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge(f"{p}:num_requests_waiting", "Requests waiting for admission.", stats.num_waiting)
        yield gauge(f"{p}:kv_cache_usage_perc", "Fraction of KV pages owned by requests (0-1).", stats.kv_usage)
        # vLLM's pre-0.9 name, which its stock dashboard still queries.
        yield gauge(f"{p}:gpu_cache_usage_perc", "KV cache usage (0-1). Same as kv_cache_usage_perc.", stats.kv_usage)
        yield counter(f"{p}:num_preemptions", "Requests preempted since start.", stats.num_preemptions)
        yield counter(f"{p}:prefix_cache_queries", "Prompt tokens admitted (computed or cached).",
                      stats.prefill_tokens + stats.prefix_hit_tokens)
        yield counter(f"{p}:prefix_cache_hits", "Prompt tokens served from the prefix cache.", stats.prefix_hit_tokens)

        o = OWN
        yield counter(f"{o}:device_busy_seconds", "Time the device ran batches.", stats.device_busy_s)
        yield counter(f"{o}:device_idle_seconds",
                      "Time the device sat idle between consecutive batches (the overlap gap).", stats.device_idle_s)
        yield gauge(f"{o}:engine_alive", "1 while the engine loop runs.", int(self.engine.is_alive))
        # KV memory: where the pages are, how bold admission is, what the prefix cache saves.
        pages = GaugeMetricFamily(f"{o}:kv_pages", "KV pages by state: total; used (held by requests); "
                                  "promised (used + promised at admission, not grown into yet); cached (prefix "
                                  "cache, locked or evictable).", labels=["model_name", "state"])
        for state, n in (("total", stats.kv_pages_total), ("used", stats.kv_pages_used),
                         ("promised", stats.kv_pages_promised), ("cached", stats.kv_pages_cached)):
            pages.add_metric([self.name, state], n)
        # Where every page is (these sum to total): free, private to a request, cached, and the
        # disaggregation states a peer may touch (sending on P; receiving, quarantined on D).
        for state, n in stats.kv_page_states.items():
            if state != "cached":
                pages.add_metric([self.name, state], n)
        yield pages
        if (t := stats.transfers) is not None:
            results = CounterMetricFamily(f"{o}:kv_transfers", "KV transfers (rooms) by result.",
                                          labels=["model_name", "result"])
            for result, n in t.results.items():
                results.add_metric([self.name, result], n)
            yield results
            yield counter(f"{o}:kv_transfer_bytes", "KV bytes pushed (prefill) or received (decode).", t.bytes)
            yield counter(f"{o}:kv_transfer_seconds", "Seconds rooms spent transferring (prefill: first WRITE "
                          "to last done; decode: /kv/ready to room:done), summed.", t.seconds)
            yield counter(f"{o}:kv_quarantine_seconds", "Seconds pages spent quarantined, summed over rooms.",
                          t.quarantine_seconds)
        yield gauge(f"{o}:reservation_beta", "Share of max_tokens promised at admission.", stats.reservation_beta)
        yield counter(f"{o}:num_retractions", "Preemptions because the KV pool ran dry.", stats.num_retractions)
        yield counter(f"{o}:num_swapped_out", "Retracted requests whose KV went to host memory.",
                      stats.num_swapped_out)
        # The scheduling policy's own numbers (SJF's predictor tau, adaptive's switches, fair's
        # counter gap), one gauge each: a policy adds a metric by returning another key.
        for key, value in stats.policy_metrics.items():
            yield gauge(f"{o}:{key}", f"Scheduling policy metric {key}.", value)


class HttpMetrics:
    """What exists before the engine does: HTTP outcomes and durations by handler."""

    def __init__(self, prefix: str, model_name: Callable[[], str]) -> None:
        if prefix not in PREFIXES:
            raise ValueError(f"metrics prefix must be one of {', '.join(PREFIXES)}, got {prefix!r}")
        self.prefix = prefix
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter(f"{OWN}:http_responses", "HTTP responses by status code.",
                                 ["model_name", "status"], registry=r)
        self.duration = Histogram(f"{OWN}:http_request_duration_seconds",
                                  "HTTP request duration (to the last byte of a stream) by route.",
                                  ["model_name", "handler", "method", "status"], buckets=_HTTP_BUCKETS, registry=r)
        self.engine: EngineMetrics | None = None

    def observe(self, handler: str, method: str, status: int, seconds: float) -> None:
        name = self.model_name()
        self.responses.labels(name, str(status)).inc()
        self.duration.labels(name, handler, method, str(status)).observe(seconds)

    def attach(self, engine) -> "EngineMetrics":
        self.engine = EngineMetrics(self.registry, self.prefix, engine)
        return self.engine

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """Per-request and per-step series; created once the engine has loaded (buckets need its context length)."""

    def __init__(self, registry: CollectorRegistry, prefix: str, engine) -> None:
        r, p = registry, prefix
        name = engine.model_name
        labels = ["model_name"]
        max_len = engine.max_model_len
        tokens = buckets_1_2_5(max_len)

        def hist(metric: str, doc: str, buckets) -> Histogram:
            return Histogram(f"{p}:{metric}", doc, labels, buckets=buckets, registry=r).labels(name)

        self._success = Counter(f"{p}:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        for reason in ("stop", "length", "abort", "error"):  # every reason exists from the start: rate() needs a 0
            self._success.labels(name, reason)
        self.name = name
        self.num_prompt_tokens = 0  # the counters' totals, readable (the stats line's throughput)
        self.num_generation_tokens = 0
        self.prompt_tokens = Counter(f"{p}:prompt_tokens", "Prompt tokens prefilled (counted at the first token).",
                                     labels, registry=r).labels(name)
        self.generation_tokens = Counter(f"{p}:generation_tokens", "Tokens generated (counted as they stream).",
                                         labels, registry=r).labels(name)
        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens, one sample per token.",
                        _ITL_BUCKETS)
        # vLLM <= 0.10's name for the same per-token series; its stock dashboard queries it.
        self.tpot_per_token = hist("time_per_output_token_seconds",
                                   "Time between consecutive output tokens (= inter_token_latency_seconds).",
                                   _ITL_BUCKETS)
        self.request_tpot = hist("request_time_per_output_token_seconds",
                                 "Per request: (finish - first token) / (output tokens - 1).", _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled (waiting).", _REQUEST_BUCKETS)
        self.inference = hist("request_inference_time_seconds", "First scheduled to finish (running).",
                              _REQUEST_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "First scheduled to first token.", _REQUEST_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "First token to finish.", _REQUEST_BUCKETS)
        self.request_prompt = hist("request_prompt_tokens", "Prompt tokens per finished request.", tokens)
        self.request_generation = hist("request_generation_tokens", "Generated tokens per finished request.", tokens)
        self.max_generation = hist("request_max_num_generation_tokens",
                                   "Per HTTP request: the most tokens any of its n choices generated.", tokens)
        self.params_max_tokens = hist("request_params_max_tokens", "The max_tokens a request was given.", tokens)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens per engine step (prefill + decode).",
                                     _ITERATION_BUCKETS)
        cfg = engine.config
        stats = engine.stats()
        info = {
            "block_size": str(cfg.block_size), "num_gpu_blocks": str(stats.kv_pages_total),
            "enable_prefix_caching": str(cfg.enable_prefix_caching), "cache_dtype": "auto",
            "gpu_memory_utilization": str(cfg.gpu_memory_utilization), "swap_space": str(cfg.swap_space),
            "preemption_mode": cfg.preemption_mode, "reservation": cfg.reservation,
        }
        Gauge(f"{p}:cache_config_info", "KV cache configuration (value 1; the labels say it).",
              ["model_name", *info], registry=r).labels(name, *info.values()).set(1)
        r.register(_EngineCollector(engine, p))

    def observe_output(self, out: RequestOutput, previous_at: float | None, now: float) -> None:
        """One streamed delta; ``previous_at`` is when this request's previous delta came (None: first)."""
        n = len(out.token_ids)
        if n:
            self.generation_tokens.inc(n)
            self.num_generation_tokens += n
        if previous_at is None:
            if n or out.first_token_time is not None:
                self.prompt_tokens.inc(out.num_prompt_tokens)
                self.num_prompt_tokens += out.num_prompt_tokens
            return
        if n:  # a delta of several tokens spreads its gap over them: one sample per token, as vLLM
            gap = (now - previous_at) / n
            for _ in range(n):
                self.itl.observe(gap)
                self.tpot_per_token.observe(gap)

    def observe_finished(self, out: RequestOutput) -> None:
        self._success.labels(self.name, out.finish_reason or "abort").inc()
        self.request_prompt.observe(out.num_prompt_tokens)
        self.request_generation.observe(out.num_output_tokens)
        scheduled_time = out.scheduled_time
        if out.finish_time is not None:
            self.e2e.observe(out.finish_time - out.arrival_time)
        if scheduled_time is not None:
            self.queue.observe(scheduled_time - out.arrival_time)
            if out.finish_time is not None:
                self.inference.observe(out.finish_time - scheduled_time)
            if out.first_token_time is not None:
                self.prefill.observe(out.first_token_time - scheduled_time)
        if out.first_token_time is not None:
            self.ttft.observe(out.first_token_time - out.arrival_time)
            if out.finish_time is not None:
                self.decode.observe(out.finish_time - out.first_token_time)
                if out.num_output_tokens > 1:
                    self.request_tpot.observe((out.finish_time - out.first_token_time) / (out.num_output_tokens - 1))

    def observe_plan(self, requests: Sequence[Request]) -> None:
        """One HTTP request's engine requests, all finished (or let go of)."""
        if not requests:
            return
        for req in requests:
            self.params_max_tokens.observe(req.max_new_tokens)
        self.max_generation.observe(max(len(req.output_token_ids) for req in requests))
