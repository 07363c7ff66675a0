"""The load generator: arrival processes, metric definitions, and runs over loopback HTTP.

Fake servers are aiohttp apps in the test's event loop that stream scripted chunks; the end-to-end
test drives the real server (a tiny random Llama with SmolLM2's tokenizer). Nothing here sleeps
to synchronise: the concurrency gate waits on a condition, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from conveyor.runtime.tools.loadgen import amain
from conveyor.runtime.tools.loadgen.arrivals import arrival_offsets, read_length_rows, trace_offsets
from conveyor.runtime.tools.loadgen.client import RequestRecord
from conveyor.runtime.tools.loadgen.main import build_parser
from conveyor.runtime.tools.loadgen.report import (
    RunResult,
    meets_slo,
    parse_slo,
    peak_concurrency,
    peak_output_per_s,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {"date": "", "base_url": "", "endpoint": "", "model": "m", "workload": "random", "request_rate": "inf",
          "burstiness": 1.0, "max_concurrency": None, "num_prompts": 4}


# -- arrivals -------------------------------------------------------------------------------
def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


def test_poisson_mean_rate_and_variance():
    rate = 5.0
    g = gaps(arrival_offsets(20_001, rate, burstiness=1.0, seed=0))
    # exponential gaps: mean 1/rate and variance 1/rate^2; 20k samples put both within a few %
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)
    assert g.var() == pytest.approx(1 / rate**2, rel=0.06)
    assert arrival_offsets(5, rate, seed=0) == arrival_offsets(5, rate, seed=0)  # a seed replays exactly


def test_gamma_burstiness_scales_variance_not_mean():
    rate, n = 4.0, 20_001
    poisson = gaps(arrival_offsets(n, rate, 1.0, seed=1)).var()
    for burstiness in (0.25, 4.0):
        g = gaps(arrival_offsets(n, rate, burstiness, seed=1))
        assert g.mean() == pytest.approx(1 / rate, rel=0.05)
        # variance is 1/(rate^2 * burstiness): 4x for bursty 0.25, 1/4 for steady 4
        assert g.var() / poisson == pytest.approx(1 / burstiness, rel=0.12)


def test_rate_inf_sends_everything_at_once():
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


def test_trace_replay_scales_timestamps(tmp_path: Path):
    csv = tmp_path / "trace.csv"
    csv.write_text("timestamp,prompt_tokens,output_tokens\n12.0,30,3\n10.0,10,1\n10.5,20,2\n")
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text("\n".join(json.dumps({"arrival_s": t, "input_tokens": p, "output_len": o})
                               for t, p, o in [(12.0, 30, 3), (10.0, 10, 1), (10.5, 20, 2)]))
    for path in (csv, jsonl):
        rows = read_length_rows(path, with_time=True)
        assert [(r.prompt_tokens, r.output_tokens) for r in rows] == [(10, 1), (20, 2), (30, 3)]  # arrival order
        assert trace_offsets(rows, speed=1.0) == [0.0, 0.5, 2.0]
        assert trace_offsets(rows, speed=2.0) == [0.0, 0.25, 1.0]


# -- metrics --------------------------------------------------------------------------------
def hand_records() -> list[RequestRecord]:
    def rec(i, ttft, itl, e2e, out, status=200):
        return RequestRecord(index=i, prompt_len=10, output_len=out, ttft_s=ttft, itl_s=itl, e2e_s=e2e,
                             prompt_tokens=10, output_tokens=out, status=status)

    return [
        rec(0, 0.1, [0.02, 0.03, 0.05], 0.2, 4),  # TPOT (0.2 - 0.1) / 3 = 33.33 ms
        rec(1, 0.3, [0.1], 0.4, 2),  # TPOT 100 ms
        rec(2, 0.2, [], 0.2, 1),  # one token: no TPOT
        RequestRecord(index=3, prompt_len=10, output_len=5, status=503, error="overloaded"),
    ]


def test_metrics_match_hand_computation():
    res = summarize(hand_records(), 2.0, parse_slo("ttft_ms=250,tpot_ms=50"), **CONFIG)
    assert (res.completed, res.failed, res.failures_by_status) == (3, 1, {"503": 1})
    assert res.total_output_tokens == 7 and res.total_input_tokens == 30
    assert res.request_throughput == pytest.approx(1.5)
    assert res.output_throughput == pytest.approx(3.5)
    # TTFT ms [100, 300, 200]; numpy's linear percentile: p90 at rank 1.8 of the sorted list
    assert res.mean_ttft_ms == pytest.approx(200) and res.median_ttft_ms == pytest.approx(200)
    assert (res.p90_ttft_ms, res.p95_ttft_ms, res.p99_ttft_ms) == pytest.approx((280, 290, 298))
    # ITL ms, every gap of every request: [20, 30, 50, 100]
    assert res.mean_itl_ms == pytest.approx(50) and res.median_itl_ms == pytest.approx(40)
    assert res.p90_itl_ms == pytest.approx(85)
    # TPOT ms [33.33, 100]: only requests with more than one output token
    assert res.mean_tpot_ms == pytest.approx(200 / 3)
    assert res.p90_tpot_ms == pytest.approx(100 / 3 + 0.9 * 200 / 3)
    assert res.requests[0].tpot_s == pytest.approx(0.1 / 3) and res.requests[2].tpot_s is None
    # E2E ms [200, 400, 200]
    assert res.mean_e2el_ms == pytest.approx(800 / 3) and res.p99_e2el_ms == pytest.approx(396)
    # goodput: #0 meets both, #1 misses TTFT, #2 has no TPOT (passes it), #3 failed -> 2 in 2 s
    assert res.request_goodput == pytest.approx(1.0)
    assert [meets_slo(r, res.slo) for r in hand_records()] == [True, False, True, False]
    assert res.itls[0] == [0.02, 0.03, 0.05] and res.errors[3] == "overloaded"


def test_all_failed_run_reports_no_data_not_zero(tmp_path: Path):
    from conveyor.runtime.tools.loadgen.plots import write_plots
    from conveyor.runtime.tools.loadgen.report import format_table

    res = summarize(hand_records()[3:], 1.0, {}, **CONFIG)
    assert (res.completed, res.failed, res.mean_ttft_ms, res.request_goodput) == (0, 1, None, None)
    assert "n/a" in format_table(res)
    assert msgspec.json.decode(msgspec.json.encode(res), type=RunResult) == res  # JSON has no NaN
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in write_plots([res], tmp_path))


def test_slo_parsing():
    assert parse_slo("ttft_ms=200,tpot_ms=50") == {"ttft_ms": 200.0, "tpot_ms": 50.0}
    assert parse_slo(None) == {}
    with pytest.raises(ValueError):
        parse_slo("ttft=200")


# -- a fake OpenAI server -------------------------------------------------------------------
class FakeServer:
    """Streams max_tokens one-character chunks, counts requests in flight, fails the ones ``fail`` names.

    ``gate``: hold each request until that many are in flight (or every request has arrived), so a
    concurrency limit that leaks shows up as more in flight than the limit.
    """

    def __init__(self, total: int, gate: int | None = None, fail: Callable[[int], str | None] = lambda n: None):
        self.total, self.gate, self.fail = total, gate, fail
        self.arrived = self.in_flight = self.max_in_flight = 0
        self.changed = asyncio.Condition()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []  # each request's Authorization header
        self.not_ready = 0  # /v1/models answers 503 this many times first (a server still loading)
        self.on_arrival: Callable[[], None] | None = None

    @staticmethod
    def token_chunks(body: dict) -> list[bytes]:
        """Completions: one ``text`` chunk per token. Chat: a role-only delta first, as OpenAI sends."""
        if "messages" not in body:
            return [b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'] * body["max_tokens"]
        role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
        return [role] + [b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'] * \
            body["max_completion_tokens"]

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.on_arrival is not None:
            self.on_arrival()
        n = self.arrived
        self.arrived += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self.changed:
                self.changed.notify_all()
                if self.gate is not None:
                    await asyncio.wait_for(self.changed.wait_for(
                        lambda: self.in_flight >= self.gate or self.arrived == self.total), timeout=10)
            failure = self.fail(n)
            if failure == "503":
                return web.json_response({"error": {"message": "overloaded"}}, status=503)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if failure == "stream":
                await resp.write(b'data: {"error": {"message": "engine died"}}\n\n')
            else:
                chunks = self.token_chunks(body)
                for chunk in chunks:
                    await resp.write(chunk)
                if body.get("stream_options", {}).get("include_usage"):
                    out = body.get("max_tokens", body.get("max_completion_tokens"))
                    usage = {"prompt_tokens": 7, "completion_tokens": out, "total_tokens": 0}
                    await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.Response:
        if self.not_ready > 0:
            self.not_ready -= 1
            return web.json_response({"error": {"message": "loading"}}, status=503)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


@pytest_asyncio.fixture
async def serve_app() -> AsyncIterator[Callable]:
    runners: list[web.AppRunner] = []

    async def start(fake: FakeServer) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", fake.completions)
        app.router.add_post("/v1/chat/completions", fake.completions)
        app.router.add_get("/v1/models", fake.models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def base_args(url: str, n: int) -> list[str]:
    return ["--base-url", url, "--num-prompts", str(n), "--input-len", "8:16", "--output-len", "3:6",
            "--no-progress"]


async def test_max_concurrency_is_never_exceeded(serve_app):
    fake = FakeServer(total=12, gate=3)
    url = await serve_app(fake)
    [res] = await amain(base_args(url, 12) + ["--max-concurrency", "3"])
    assert fake.max_in_flight == 3  # the gate made 3 wait together; a leak would let more in
    assert res.completed == 12 and res.failed == 0 and res.model == "fake-model"
    for r in res.requests:  # one chunk per token: ITLs are the gaps between them
        assert r.output_tokens == r.output_len and len(r.itl_s) == r.output_len - 1 and r.prompt_tokens == 7


async def test_chat_endpoint_sends_messages_and_times_content_deltas(serve_app):
    fake = FakeServer(total=6)
    url = await serve_app(fake)
    [res] = await amain(base_args(url, 6) + ["--endpoint", "/v1/chat/completions", "--ignore-eos"])
    assert (res.completed, res.failed, res.endpoint) == (6, 0, "/v1/chat/completions")
    for body in fake.bodies:
        assert "prompt" not in body and "max_tokens" not in body and body["ignore_eos"] is True
        [message] = body["messages"]
        assert message["role"] == "user" and len(message["content"].split()) >= 8  # --input-len 8:16 words
    for r in res.requests:
        # The role-only delta carries no text: it is neither the first token nor an ITL gap.
        assert r.output_tokens == r.output_len and len(r.itl_s) == r.output_len - 1
        assert 0 < r.ttft_s <= r.e2e_s


async def test_completions_endpoint_sends_a_prompt(serve_app):
    fake = FakeServer(total=2)
    url = await serve_app(fake)
    [res] = await amain(base_args(url, 2))
    assert res.completed == 2
    assert all("messages" not in b and isinstance(b["prompt"], str) and b["max_tokens"] >= 3 for b in fake.bodies)


async def test_failures_are_counted_by_status_and_none_lost(serve_app):
    fake = FakeServer(total=12, fail=lambda n: "stream" if n == 0 else "503" if n % 3 == 2 else None)
    url = await serve_app(fake)
    [res] = await amain(base_args(url, 12) + ["--request-rate", "inf"])
    assert len(res.requests) == 12 and fake.arrived == 12
    assert res.failures_by_status == {"503": 4, "stream_error": 1}
    assert (res.completed, res.failed) == (7, 5)
    assert sum(r.output_tokens for r in res.requests if r.success) == res.total_output_tokens


async def test_trace_replay_never_sends_early(serve_app, tmp_path: Path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"arrival_s": 100 + 0.1 * i, "prompt_tokens": 5 + i, "output_tokens": 2})
                               for i in range(4)))
    url = await serve_app(FakeServer(total=4))
    [res] = await amain(["--base-url", url, "--trace", str(trace), "--trace-speed", "2", "--no-progress"])
    assert [r.prompt_len for r in res.requests] == [5, 6, 7, 8]
    for i, r in enumerate(res.requests):
        assert r.start_s >= 0.05 * i  # offsets of 0.1 s scaled by speed 2
    assert res.workload == "trace" and res.completed == 4


async def test_length_mix_file_is_sampled(serve_app, tmp_path: Path):
    lengths = tmp_path / "sharegpt_lengths.csv"
    lengths.write_text("prompt_tokens,output_tokens\n12,3\n40,5\n")
    url = await serve_app(FakeServer(total=10))
    [res] = await amain(["--base-url", url, "--workload", "lengths", "--lengths-file", str(lengths),
                         "--num-prompts", "10", "--no-progress"])
    assert {(r.prompt_len, r.output_len) for r in res.requests} <= {(12, 3), (40, 5)}
    assert all(r.output_tokens == r.output_len for r in res.requests) and res.completed == 10


async def test_duration_stops_sending_and_waits_for_what_was_sent(serve_app):
    url = await serve_app(FakeServer(total=10))
    [res] = await amain(base_args(url, 10) + ["--request-rate", "1", "--duration", "0.05"])
    # Nothing is sent at or after its offset passes the duration; what was sent is recorded.
    expected = sum(o < 0.05 for o in arrival_offsets(10, 1.0, seed=0))
    assert len(res.requests) == res.completed == expected >= 1


async def test_rate_sweep_writes_json_per_rate_and_latency_vs_rate_plot(serve_app, tmp_path: Path):
    url = await serve_app(FakeServer(total=8))
    results = await amain(base_args(url, 4) + ["--request-rate", "200,400", "--result-json",
                                               str(tmp_path / "out.json"), "--plots", str(tmp_path / "plots")])
    assert [r.request_rate for r in results] == [200.0, 400.0]
    for rate in ("200.0", "400.0"):
        assert msgspec.json.decode((tmp_path / f"out-rate{rate}.json").read_bytes(), type=RunResult).completed == 4
    assert (tmp_path / "plots" / "latency_vs_rate.png").read_bytes()[:8] == PNG_MAGIC


async def test_api_key_extra_body_and_warmups(serve_app, monkeypatch):
    fake = FakeServer(total=6)
    url = await serve_app(fake)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    [res] = await amain(base_args(url, 4) + ["--extra-body", '{"top_k": 5, "temperature": 0.5}',
                                             "--num-warmups", "2"])
    assert fake.arrived == 6 and len(res.requests) == res.completed == 4  # warm-ups sent, not measured
    assert set(fake.auth) == {"Bearer from-env"}
    assert all(b["top_k"] == 5 and b["temperature"] == 0.5 for b in fake.bodies)  # extra body wins
    fake2 = FakeServer(total=1)
    url2 = await serve_app(fake2)
    await amain(base_args(url2, 1) + ["--api-key", "flag-key"])
    assert fake2.auth == ["Bearer flag-key"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--extra-body", "[1, 2]"])


async def test_waits_for_a_loading_server(serve_app):
    fake = FakeServer(total=2)
    fake.not_ready = 3
    url = await serve_app(fake)
    [res] = await amain(base_args(url, 2) + ["--ready-timeout", "30"])
    assert fake.not_ready == 0 and res.completed == 2
    fake.not_ready = 10**6
    with pytest.raises(ValueError, match="not ready"):
        await amain(base_args(url, 2) + ["--ready-timeout", "0.3"])


async def test_vllm_result_fields(serve_app, tmp_path: Path):
    fake = FakeServer(total=4, gate=4)  # all four in flight together
    url = await serve_app(fake)
    [res] = await amain(base_args(url, 4) + ["--save-generated-texts", "--result-json", str(tmp_path / "r.json")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["model_id"] == data["model"] == "fake-model"
    assert data["max_concurrent_requests"] == 4
    # Every chunk of this fast fake lands within a second or two: the peak second holds most of them.
    assert 0 < data["max_output_tokens_per_s"] <= res.total_output_tokens
    assert data["generated_texts"] == ["a" * r.output_len for r in res.requests]
    [plain] = await amain(base_args(url, 1))
    assert plain.generated_texts is None


def test_peak_concurrency_and_output_rate_by_hand():
    def rec(start: float, ttft: float, itl: list[float]) -> RequestRecord:
        return RequestRecord(index=0, prompt_len=1, output_len=len(itl) + 1, start_s=start, ttft_s=ttft, itl_s=itl,
                             e2e_s=ttft + sum(itl), output_tokens=len(itl) + 1, status=200)

    records = [rec(0.0, 0.1, [0.1, 0.1]), rec(0.2, 0.1, [0.2]), rec(2.0, 0.5, [])]
    assert peak_concurrency(records) == 2  # [0, 0.3] overlaps [0.2, 0.5]; [2.0, 2.5] is alone
    assert peak_output_per_s(records) == 5.0  # second 0 holds 0.1, 0.2, 0.3 and 0.3, 0.5; second 2 one


async def test_each_rate_is_written_when_it_finishes(serve_app, tmp_path: Path):
    fake = FakeServer(total=4)
    url = await serve_app(fake)
    first = tmp_path / "out-rate300.0.json"
    seen: list[bool] = []
    fake.on_arrival = lambda: seen.append(first.exists())
    await amain(base_args(url, 2) + ["--request-rate", "300,600", "--result-json", str(tmp_path / "out.json")])
    assert seen == [False, False, True, True]  # the second rate's requests found the first rate's file


# -- the real server ------------------------------------------------------------------------
async def test_real_server_end_to_end(tiny_chat_dir: Path, tmp_path: Path):
    from conveyor.runtime.async_engine import AsyncEngine
    from conveyor.runtime.engine.config import EngineConfig
    from conveyor.runtime.server.app import ServerSettings, build_app

    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=1024,
                                                   kv_cache_memory=8 << 20, max_num_seqs=16))
    runner = web.AppRunner(build_app(engine, ServerSettings()), access_log=None)
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        out = tmp_path / "result.json"
        [res] = await amain([
            "--base-url", url, "--tokenizer", str(tiny_chat_dir), "--num-prompts", "20", "--input-len", "16:64",
            "--output-len", "4:12", "--ignore-eos", "--request-rate", "100", "--max-concurrency", "8",
            "--slo", "ttft_ms=60000,tpot_ms=60000", "--result-json", str(out), "--plots", str(tmp_path / "plots"),
            "--no-progress",
        ])
    finally:
        await runner.cleanup()
        await engine.shutdown()
    data = msgspec.json.decode(out.read_bytes(), type=RunResult)
    assert data == res
    assert (data.completed, data.failed, data.failures_by_status) == (20, 0, {})
    assert data.total_output_tokens == sum(r.output_len for r in data.requests)
    for r in data.requests:
        assert r.output_tokens == r.output_len  # --ignore-eos: exact
        assert r.prompt_tokens == r.prompt_len  # prompts cut in the served model's tokens
        assert 0 < r.ttft_s <= r.e2e_s
    assert data.request_goodput == pytest.approx(data.request_throughput)
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["latency_cdf_rate100.0.png", "throughput_rate100.0.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)


async def test_real_server_chat_endpoint(tiny_chat_dir: Path):
    from conveyor.runtime.async_engine import AsyncEngine
    from conveyor.runtime.engine.config import EngineConfig
    from conveyor.runtime.server.app import ServerSettings, build_app

    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=512,
                                                   kv_cache_memory=4 << 20, max_num_seqs=8))
    runner = web.AppRunner(build_app(engine, ServerSettings()), access_log=None)
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        [res] = await amain(["--base-url", url, "--endpoint", "/v1/chat/completions", "--tokenizer",
                             str(tiny_chat_dir), "--num-prompts", "6", "--input-len", "16:32", "--output-len", "4:8",
                             "--ignore-eos", "--no-progress"])
    finally:
        await runner.cleanup()
        await engine.shutdown()
    assert (res.completed, res.failed) == (6, 0)
    for r in res.requests:
        assert r.output_tokens == r.output_len  # counted by the server's usage chunk
        assert r.prompt_tokens > r.prompt_len  # the chat template wraps the message
        assert 0 < r.ttft_s <= r.e2e_s


def test_cli_forwards_to_loadgen(capsys):
    # Through the parser, not runtime.cli.main: main configures process-wide logging, which the
    # server tests that capture log lines must not inherit.
    from conveyor.runtime.cli import build_parser
    from conveyor.runtime.tools.loadgen import main

    args = build_parser().parse_args(["loadgen", "--request-rate", "2,4", "--help"])
    assert (args.command, args.args) == ("loadgen", ["--request-rate", "2,4", "--help"])
    with pytest.raises(SystemExit) as exc:
        main(args.args)
    assert exc.value.code == 0
    assert "--request-rate" in capsys.readouterr().out
