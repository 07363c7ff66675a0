"""Operating the server like vLLM: metrics a vLLM dashboard reads, auth, CORS, request ids, logs,
the ops endpoints, binding before the model loads, and a CLI that parses flags without torch.

Servers run over loopback HTTP against one tiny random Llama with SmolLM2's tokenizer; every test
that sends work ends by waiting (bounded) until the engine is idle with every KV page free.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio
import structlog
from promql_subset import Evaluator, scrape
from structlog.testing import capture_logs
from test_server import Server, free_port, metrics, start_server, wait_until_idle

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import STATE, ServerSettings, build_app
from conveyor.runtime.server.endpoints import ROUTES, openapi_spec
from conveyor.runtime.server.protocol import ErrorResponse
from conveyor.runtime.server.stats_log import StatsLogger

pytestmark = pytest.mark.asyncio(loop_scope="module")

C = "/v1/completions"
QUERIES = Path(__file__).parent / "data" / "vllm_dashboard_queries.txt"
REQUEST = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_chat_dir: Path) -> AsyncIterator[AsyncEngine]:
    eng = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=512,
                                                kv_cache_memory=8 << 20, max_num_seqs=8))
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(loop_scope="module")
async def serve(engine: AsyncEngine) -> AsyncIterator:
    """``await serve(**settings)`` -> a server over the shared engine; all are stopped afterwards."""
    servers: list[Server] = []

    async def start(**settings) -> Server:
        server = await start_server(engine, ServerSettings(stats_interval_s=0, **settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.runner.cleanup()
    await wait_until_idle(engine)


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def assert_error_shape(body: dict, code: str | None = None) -> None:
    err = msgspec.convert(body, ErrorResponse).error  # OpenAI's shape, or this raises
    assert err.message and err.type
    if code is not None:
        assert err.code == code, body


# -- metrics --------------------------------------------------------------------------------
def dashboard_queries(model: str) -> list[str]:
    lines = [ln.strip() for ln in QUERIES.read_text().splitlines()]
    return [ln.replace("$model_name", model).replace("$__rate_interval", "1m")
            for ln in lines if ln and not ln.startswith("#")]


async def test_vllm_dashboard_queries_return_data(serve, http: aiohttp.ClientSession) -> None:
    """Every target of vLLM's stock Grafana dashboard (12 panels) finds series with samples."""
    server = await serve(metrics_prefix="vllm")
    before = scrape(await (await http.get(server.url + "/metrics")).text())
    requests = [http.post(server.url + C, json={**REQUEST, "n": 2}),
                http.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})]
    for resp in await asyncio.gather(*requests):
        assert resp.status == 200
        await resp.read()
    after = scrape(await (await http.get(server.url + "/metrics")).text())
    ev = Evaluator(before, after, seconds=60.0)
    queries = dashboard_queries(server.model)
    assert len(queries) == 27
    for q in queries:
        result = ev.eval(q)
        assert result, f"no series: {q}"
        assert all(not math.isnan(v) for v in result.values()), f"NaN (no samples): {q} -> {result}"
        if "rate(" in q or "increase(" in q:
            assert any(v > 0 for v in result.values()), f"nothing moved: {q} -> {result}"
    # The dashboard's model picker: label_values({__name__=~"vllm:.*"}, model_name).
    names = {dict(k).get("model_name") for k in after if dict(k)["__name__"].startswith("vllm:")}
    assert names == {server.model}
    # Without the switch the same queries find nothing: the evaluator can fail.
    plain = await serve()
    ours = scrape(await (await http.get(plain.url + "/metrics")).text())
    assert not Evaluator(ours, ours, 60.0).eval(queries[0])
    await wait_until_idle(server.engine)


async def test_inter_token_latency_is_per_token(serve, http: aiohttp.ClientSession) -> None:
    server = await serve()
    before = await metrics(http, server)
    async with http.post(server.url + C, json={**REQUEST, "max_tokens": 6, "n": 2}) as resp:
        assert resp.status == 200
    after = await metrics(http, server)

    def delta(name: str) -> float:
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    assert delta("conveyor:inter_token_latency_seconds_count") == 2 * 5  # tokens after the first, per choice
    assert delta("conveyor:request_time_per_output_token_seconds_count") == 2
    assert delta("conveyor:request_max_num_generation_tokens_sum") == 6  # one observation per HTTP request
    assert delta("conveyor:request_generation_tokens_sum") == 12
    await wait_until_idle(server.engine)


# -- api key, CORS, request ids -------------------------------------------------------------
async def test_api_key(serve, http: aiohttp.ClientSession) -> None:
    server = await serve(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic s3cret"}):
        async with http.post(server.url + C, json=REQUEST, headers=headers) as resp:
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert_error_shape(await resp.json(), "invalid_api_key")
    async with http.post(server.url + C, json=REQUEST, headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200
    for path in ("/health", "/metrics"):  # open by default: probes and scrapers hold no key
        async with http.get(server.url + path) as resp:
            assert resp.status == 200
    async with http.get(server.url + "/v1/models") as resp:
        assert resp.status == 401
    closed = await serve(api_key="s3cret", open_paths=())
    async with http.get(closed.url + "/metrics") as resp:
        assert resp.status == 401
    await wait_until_idle(server.engine)


async def test_cors(serve, http: aiohttp.ClientSession) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    server = await serve(allowed_origins=("https://ui.example",), api_key="k")
    async with http.options(server.url + C, headers=preflight) as resp:  # no key: preflights carry none
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    async with http.post(server.url + C, json=REQUEST,
                         headers={"Origin": "https://ui.example", "Authorization": "Bearer k"}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
    async with http.options(server.url + C, headers={**preflight, "Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert_error_shape(await resp.json(), "cors_forbidden")
    anywhere = await serve(allowed_origins=("*",))
    async with http.options(anywhere.url + C, headers={**preflight, "Origin": "https://any.example"}) as resp:
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*"
    off = await serve()
    async with http.options(off.url + C, headers=preflight) as resp:
        assert resp.status == 403
    async with http.post(off.url + C, json=REQUEST, headers={"Origin": "https://ui.example"}) as resp:
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    await wait_until_idle(server.engine)


async def test_request_id_echoed_generated_and_logged(serve, http: aiohttp.ClientSession) -> None:
    server = await serve()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with http.post(server.url + C, json=REQUEST, headers={"X-Request-Id": "trace-42"}) as resp:
            assert resp.status == 200 and resp.headers["X-Request-Id"] == "trace-42"
            await resp.read()
        async with http.post(server.url + C, json={**REQUEST, "stream": True}) as resp:  # a stream carries it too
            generated = resp.headers["X-Request-Id"]
            assert len(generated) == 32 and int(generated, 16) >= 0
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        async with http.get(server.url + "/v1/models", headers={"X-Request-Id": "bad id\twith spaces"}) as resp:
            replaced = resp.headers["X-Request-Id"]
            assert replaced != "bad id\twith spaces" and len(replaced) == 32
    finished = [e for e in logs if e["event"] == "request finished"]
    assert {e["x_request_id"] for e in finished} == {"trace-42", generated}
    access = {e["x_request_id"]: e for e in logs if e["event"] == "http request"}
    assert access["trace-42"]["status"] == 200 and access[generated]["path"] == C
    await wait_until_idle(server.engine)


async def test_access_log_and_rejection_lines(serve, http: aiohttp.ClientSession) -> None:
    server = await serve()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with http.post(server.url + C, json=REQUEST) as resp:
            ok_body = await resp.read()
        async with http.post(server.url + C, json={"prompt": [5], "max_tokens": -1}) as resp:
            assert resp.status == 400
            bad_body = await resp.read()
        async with http.get(server.url + "/nowhere") as resp:
            assert resp.status == 404
    access = [e for e in logs if e["event"] == "http request"]
    assert [(e["method"], e["path"], e["status"]) for e in access] == [
        ("POST", C, 200), ("POST", C, 400), ("GET", "/nowhere", 404)]
    assert access[0]["bytes"] == len(ok_body) and access[1]["bytes"] == len(bad_body)
    assert all(e["duration_s"] >= 0 and e["x_request_id"] for e in access)
    rejected = [e for e in logs if e["event"] == "request rejected"]
    assert [(e["status"], e["param"]) for e in rejected] == [(400, "max_tokens"), (404, None)]
    assert all(e["log_level"] == "warning" for e in rejected)
    # HTTP durations by route; unknown paths share one label, so scanners cannot grow the series.
    after = await metrics(http, server)
    keys = {dict(k[1]).get("handler") for k in after if k[0] == "conveyor:http_request_duration_seconds_count"}
    assert {"/v1/completions", "unmatched"} <= keys and "/nowhere" not in keys
    await wait_until_idle(server.engine)


async def test_periodic_stats_line(serve, http: aiohttp.ClientSession) -> None:
    server = await serve()
    now = [0.0]
    stats = StatsLogger(server.engine, server.app[STATE].engine_metrics, clock=lambda: now[0])
    with capture_logs() as logs:
        async with http.post(server.url + C, json={**REQUEST, "max_tokens": 5}) as resp:
            assert resp.status == 200
        now[0] = 2.0
        busy = stats.tick()
        now[0] = 4.0
        stats.tick()  # the first idle tick after work still logs at info (throughput fell to 0)
        now[0] = 6.0
        stats.tick()
    assert busy["prompt_throughput_tps"] == 1.5 and busy["generation_throughput_tps"] == 2.5  # 3 and 5 over 2 s
    assert busy["running"] == 0 and busy["waiting"] == 0 and 0 <= busy["kv_usage_pct"] <= 100
    assert 0 <= busy["device_idle_fraction"] <= 1
    lines = [e for e in logs if e["event"] == "engine stats"]
    assert [e["log_level"] for e in lines] == ["info", "info", "debug"]  # an idle server stays quiet
    await wait_until_idle(server.engine)


# -- ops endpoints --------------------------------------------------------------------------
async def test_tokenize_and_detokenize(serve, http: aiohttp.ClientSession) -> None:
    server = await serve()
    tok = server.engine.tokenizer
    async with http.post(server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}) as r:
        out = await r.json()
    assert out["tokens"] == tok.encode("Hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512 and out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    async with http.post(server.url + "/detokenize", json={"tokens": out["tokens"]}) as r:
        assert (await r.json()) == {"prompt": "Hello world"}
    # messages: the very ids a chat completion prefills (its usage says how many)
    messages = [{"role": "user", "content": "hi there"}]
    async with http.post(server.url + "/tokenize", json={"messages": messages}) as r:
        chat = await r.json()
    async with http.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}) as r:
        assert (await r.json())["usage"]["prompt_tokens"] == chat["count"]
    assert "token_strs" not in chat
    cases = [("/tokenize", {"prompt": "a", "messages": messages}, 400, "prompt"),
             ("/tokenize", {}, 400, "prompt"),
             ("/tokenize", {"prompt": 5}, 400, "prompt"),
             ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
             ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens[1]"),
             ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
             ("/detokenize", {}, 400, "tokens")]
    for path, body, status, param in cases:
        async with http.post(server.url + path, json=body) as r:
            assert r.status == status, (path, body)
            err = await r.json()
            assert_error_shape(err)
            assert err["error"]["param"] == param, (path, body, err)


async def test_version_server_info_and_model_cards(serve, http: aiohttp.ClientSession) -> None:
    server = await serve(api_key="k")
    auth = {"Authorization": "Bearer k"}
    async with http.get(server.url + "/version", headers=auth) as r:
        assert (await r.json())["version"]
    async with http.get(server.url + "/server_info", headers=auth) as r:
        info = await r.json()
    assert info["served_model_name"] == server.model and info["max_model_len"] == 512
    assert info["engine_config"]["max_num_seqs"] == 8 and info["versions"]["torch"]
    assert info["server_settings"]["api_key"] == "<set>" and "k" not in json.dumps(info["server_settings"]["api_key"])
    async with http.get(server.url + "/get_server_info", headers=auth) as r:
        assert (await r.json())["served_model_name"] == server.model
    async with http.get(server.url + "/v1/models", headers=auth) as r:
        [card] = (await r.json())["data"]
    assert card["root"] == str(server.engine.config.model) and card["parent"] is None
    async with http.get(server.url + f"/v1/models/{server.model}", headers=auth) as r:
        assert (await r.json()) == card
    async with http.get(server.url + "/v1/models/org/other-model", headers=auth) as r:
        assert r.status == 404
        assert_error_shape(await r.json(), "model_not_found")


async def test_openapi_is_generated_from_the_wire_types(serve, http: aiohttp.ClientSession) -> None:
    server = await serve()
    async with http.get(server.url + "/openapi.json") as r:
        spec = await r.json()
    assert spec["openapi"].startswith("3.") and spec == json.loads(json.dumps(openapi_spec()))
    schemas = spec["components"]["schemas"]
    bodies = [r[2] for r in ROUTES if r[2] is not None]
    _, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    for name, schema in components.items():  # each request type's schema is msgspec's, not hand-written
        assert schemas[name] == json.loads(json.dumps(schema)), name
    assert "max_tokens" in schemas["CompletionRequest"]["properties"]
    # Every route the app serves is in the spec (the fuzz test drives what the spec lists).
    served = {(r.method.lower(), r.resource.canonical.replace("{model_id:.+}", "{model_id}"))
              for r in server.app.router.routes() if r.method not in ("HEAD", "OPTIONS")}
    served.discard(("get", "/get_server_info"))  # an alias of /server_info
    listed = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert served == listed


# -- startup --------------------------------------------------------------------------------
async def test_loading_until_the_engine_attaches(engine: AsyncEngine, http: aiohttp.ClientSession) -> None:
    from aiohttp import web

    from conveyor.runtime.server.app import attach_engine
    from conveyor.runtime.server.serve import make_runner

    app = build_app(None, ServerSettings(stats_interval_s=0), loading_name="tiny")
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        for path in ("/health", C):
            req = http.get(url + path) if path == "/health" else http.post(url + path, json=REQUEST)
            async with req as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert_error_shape(await r.json(), "loading")
        async with http.get(url + "/version") as r:
            assert r.status == 200
        async with http.get(url + "/metrics") as r:  # HTTP series exist already, labelled with the name to be
            assert r.status == 200 and 'model_name="tiny"' in await r.text()
        attach_engine(app, engine)
        async with http.get(url + "/health") as r:
            assert r.status == 200
        async with http.post(url + C, json=REQUEST) as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    await wait_until_idle(engine)


async def test_serve_subprocess_binds_early_and_logs_json(tiny_chat_dir: Path, http: aiohttp.ClientSession) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor", "--log-level", "debug", "serve", "--model", str(tiny_chat_dir),
        "--port", str(port), "--max-model-len", "512", "--kv-cache-memory", "8MiB", "--stats-interval", "0.2",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    statuses: list[int] = []
    stderr = asyncio.create_task(proc.stderr.read())  # drained as it comes: a full pipe would block the server
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not statuses or statuses[-1] != 200:  # bounded poll until /health says 200
            assert proc.returncode is None and loop.time() < deadline, "server did not come up"
            try:
                async with http.get(url + "/health") as resp:
                    statuses.append(resp.status)
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        assert set(statuses) <= {200, 503}
        async with http.post(url + C, json=REQUEST, headers={"X-Request-Id": "sub-1"}) as resp:
            assert resp.status == 200 and resp.headers["X-Request-Id"] == "sub-1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = (await asyncio.wait_for(stderr, 30)).decode().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON record
    events = [r["event"] for r in records]
    assert events.index("loading model") < events.index("engine ready") < events.index("serving")
    assert any(r["event"] == "http request" and r.get("x_request_id") == "sub-1" for r in records)
    assert any(r["event"] == "request admitted" and r["level"] == "debug" for r in records)
