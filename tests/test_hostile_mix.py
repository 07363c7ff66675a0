"""Random interleavings of good, bad and abandoned requests (hypothesis), and a bounded soak.

After every case: no request left in the engine, every KV page back, the integrity check holds,
and an innocent stream that ran alongside finished normally with all its tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import Server, sse_events, start_server, wait_for, wait_until_idle

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import STATE, ServerSettings
from conveyor.scheduler import SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")

C = "/v1/completions"
MAX_LEN = 256


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_chat_dir: Any) -> AsyncIterator[Server]:
    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=MAX_LEN,
                                                   kv_cache_memory=4 << 20, max_num_seqs=32))
    srv = await start_server(engine, ServerSettings(max_waiting_requests=4096))
    yield srv
    await srv.runner.cleanup()
    await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


INVALID: list[Any] = [
    {"prompt": "x", "top_k": 2**63}, {"prompt": "x", "temperature": 1e-40}, {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "n": 0}, {"prompt": "x", "stop": ["s"] * 40}, {"prompt": [5] * (MAX_LEN + 5)},
    {"prompt": "x", "max_tokens": 0}, {"prompt": [10**9]}, b'{"prompt": ', b"[" * 5000,
]

valid = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(5, 2000), min_size=1, max_size=40),
    "max_tokens": st.integers(1, 12),
    "temperature": st.sampled_from([0.0, 0.7, 1.3]),
    "top_k": st.sampled_from([0, 1, 20]),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "ignore_eos": st.just(True),
    "stop": st.sampled_from([None, ["a"], ["the", " of"]]),
})
action = st.one_of(
    st.tuples(st.just("valid"), valid),
    st.tuples(st.just("invalid"), st.sampled_from(INVALID)),
    st.tuples(st.just("abandon"), valid),  # a stream closed after its first event
    st.tuples(st.just("poison"), st.integers(1, 6)),  # bad params behind the server's back, into the engine
)


async def one(srv: Server, http: aiohttp.ClientSession, kind: str, arg: Any) -> None:
    if kind == "poison":
        req = srv.engine.make_request([5, 6, 7], SamplingParams(max_tokens=arg))
        req.params.top_k = 2**63
        outs = [o async for o in srv.engine.submit(req)]
        assert outs[-1].finish_reason == "error"
        return
    if kind == "invalid":
        kwargs = {"data": arg} if isinstance(arg, bytes) else {"json": arg}
        async with http.post(srv.url + C, **kwargs) as resp:
            assert resp.status == 400, await resp.text()
            assert "error" in await resp.json()
        return
    body = {k: v for k, v in arg.items() if v is not None}
    if kind == "abandon":
        body["stream"] = True
        body["max_tokens"] = 200
        resp = await http.post(srv.url + C, json=body)
        assert resp.status == 200
        await anext(sse_events(resp))
        resp.close()
        return
    async with http.post(srv.url + C, json=body) as resp:
        assert resp.status == 200, await resp.text()
        if body.get("stream"):
            events = [e async for e in sse_events(resp)]
            assert events[-1] == b"[DONE]"
        else:
            out = await resp.json()
            assert len(out["choices"]) == body["n"]
            assert all(c["finish_reason"] in ("length", "stop") for c in out["choices"])


async def innocent(srv: Server, http: aiohttp.ClientSession) -> None:
    body = {"prompt": [9, 8, 7, 6], "max_tokens": 30, "ignore_eos": True, "stream": True, "temperature": 0}
    async with http.post(srv.url + C, json=body) as resp:
        events = [json.loads(e) for e in [e async for e in sse_events(resp)][:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(actions=st.lists(action, min_size=1, max_size=8))
async def test_random_mix_of_good_and_bad_requests_never_hurts_anyone_else(
        server: Server, session: aiohttp.ClientSession, actions: list[tuple[str, Any]]) -> None:
    failures = server.engine.num_step_failures
    await asyncio.wait_for(asyncio.gather(innocent(server, session), *(one(server, session, k, a) for k, a in actions)),
                           120)
    await wait_until_idle(server.engine, timeout=30)
    # A handler learns of its client's disconnect on its own schedule, after the engine let go.
    await wait_for(lambda: not server.app[STATE].inflight.ids, 10, "abandoned handlers to clean up")
    # A poisoned request fails a step at most (when it was already running); never an unblamed one.
    assert server.engine.num_step_failures - failures <= sum(k == "poison" for k, _ in actions)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def test_soak_aborts_and_invalid_bodies_leak_nothing(server: Server, session: aiohttp.ClientSession) -> None:
    """2,000 short requests at concurrency 64: 30% abandoned mid-stream, 5% invalid."""
    total, concurrency = 2000, 64
    kinds = ["invalid" if i % 20 == 0 else "abandon" if i % 10 < 3 else "valid" for i in range(total)]
    todo = iter(enumerate(kinds))

    async def worker() -> None:
        for i, kind in todo:
            if kind == "invalid":
                await one(server, session, kind, INVALID[i % len(INVALID)])
            else:
                await one(server, session, kind, {"prompt": [5 + i % 50, 6, 7], "max_tokens": 1 + i % 4, "n": 1,
                                                  "stream": i % 2 == 0, "ignore_eos": True})

    async def run(n: int) -> None:
        nonlocal todo
        todo = iter(enumerate(kinds[:n]))
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 300)
        await wait_until_idle(server.engine, timeout=30)

    await run(200)  # warm-up: allocator pools, caches, first-touch pages
    before = rss_bytes()
    await run(total)
    grown = rss_bytes() - before
    sched = server.engine.core.scheduler
    assert not sched.requests and not sched.running and not sched.draining
    assert sched.kv.num_available_pages == sched.kv.total_pages
    assert not server.app[STATE].inflight.ids and not server.engine._streams
    assert server.engine.num_step_failures == 0
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB over {total} requests"
