"""The server against hostile or careless clients: range bounds, raw-socket abuse, stalls, timeouts.

Reuses test_server.py's fixtures and helpers (a tiny random Llama with SmolLM2's tokenizer).
Every wait is bounded; no test asserts on how long something took.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from structlog.testing import capture_logs
from test_server import (  # noqa: F401  (fixtures are found by name)
    CHAT,
    LONG,
    OK_MSG,
    TINY_MAX_LEN,
    C,
    Server,
    assert_still_serves,
    free_port,
    http,
    sse_events,
    start_server,
    tiny,
    tiny_engine,
    tiny_model_dir,
    wait_for,
    wait_until_idle,
)

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import STATE, ServerSettings
from conveyor.runtime.server.render import ChatRenderer

pytestmark = pytest.mark.asyncio(loop_scope="module")

VOCAB = 49152
BOUNDS: list[tuple[str, str, Any, str]] = [
    # (id, path, body, param): each a 400 naming the field and its bound
    ("top-k-int64-overflow", C, {"prompt": "x", "top_k": 2**63}, "top_k"),
    ("top-k-above-vocab", C, {"prompt": "x", "top_k": VOCAB + 1}, "top_k"),
    ("temperature-tiny", C, {"prompt": "x", "temperature": 1e-40}, "temperature"),
    ("temperature-huge", C, {"prompt": "x", "temperature": 1e6}, "temperature"),
    ("temperature-inf", C, b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    ("seed-past-64-bits", C, {"prompt": "x", "seed": 2**64}, "seed"),
    ("too-many-stops", C, {"prompt": "x", "stop": [f"s{i}" for i in range(33)]}, "stop"),
    ("stop-too-long", C, {"prompt": "x", "stop": ["a" * 513]}, "stop"),
    ("stop-token-id-past-vocab", C, {"prompt": "x", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ("too-many-stop-token-ids", C, {"prompt": "x", "stop_token_ids": list(range(257))}, "stop_token_ids"),
    ("repetition-penalty-huge", C, {"prompt": "x", "repetition_penalty": 1e9}, "repetition_penalty"),
    ("prompt-too-many-chars", C, {"prompt": "a" * (TINY_MAX_LEN * 100)}, "prompt"),
    ("messages-too-many-chars", CHAT, {"messages": [{"role": "user", "content": "a" * (TINY_MAX_LEN * 100)}]},
     "messages"),
    ("chat-top-k-overflow", CHAT, {"messages": OK_MSG, "top_k": 2**63}, "top_k"),
    ("json-nested-100k-deep", C, b'{"prompt": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
]


@pytest.mark.parametrize(("path", "body", "param"), [pytest.param(*c[1:], id=c[0]) for c in BOUNDS])
async def test_out_of_range_field_is_a_400_naming_it(tiny: Server, http: aiohttp.ClientSession, path: str,
                                                     body: Any, param: str | None) -> None:
    raw = isinstance(body, bytes)
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if raw else {"json": body}
    async with http.post(tiny.url + path, **kwargs) as resp:
        assert resp.status == 400, await resp.text()
        err = (await resp.json())["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    if param is not None:
        assert param in err["message"]
        # The bound is named (a number JSON cannot hold as a float is msgspec's "Number out of range").
        assert any(ch.isdigit() for ch in err["message"]) or "out of range" in err["message"]
    await assert_still_serves(tiny, http)


async def test_overflowing_top_k_is_refused_and_innocent_streams_finish(tiny: Server,
                                                                      http: aiohttp.ClientSession) -> None:
    """The issue's first report: 3 of 3 innocent streams ended "error" and pages leaked."""
    good = {"prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True, "stream": True}

    async def stream() -> list[bytes]:
        async with http.post(tiny.url + C, json=good) as resp:
            return [e async for e in sse_events(resp)]

    async def bad() -> int:
        async with http.post(tiny.url + C, json={"prompt": "x", "top_k": 2**63, "max_tokens": 5}) as resp:
            return resp.status

    *streams, status = await asyncio.gather(stream(), stream(), stream(), bad())
    assert status == 400
    for events in streams:
        assert events[-1] == b"[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert tiny.engine.num_step_failures == 0
    await wait_until_idle(tiny.engine)


async def test_prompts_are_tokenized_off_the_event_loop_and_long_text_never(tiny: Server, http: aiohttp.ClientSession,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tiny.engine.core.inputs
    threads: list[threading.Thread] = []
    real = inputs.token_ids

    def token_ids(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(inputs, "token_ids", token_ids)
    encoded: list[int] = []
    real_encode = tiny.engine.tokenizer.encode
    monkeypatch.setattr(tiny.engine.tokenizer, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    async with http.post(tiny.url + C, json={"prompt": "hello there", "max_tokens": 2}) as resp:
        assert resp.status == 200
    async with http.post(tiny.url + CHAT, json={"messages": OK_MSG, "max_tokens": 2}) as resp:
        assert resp.status == 200
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)
    encoded.clear()
    async with http.post(tiny.url + C, json={"prompt": "word " * (inputs.max_prompt_chars // 5 + 1)}) as resp:
        assert resp.status == 400 and "characters" in (await resp.json())["error"]["message"]
    assert encoded == []  # refused by its length before the tokenizer saw it
    await wait_until_idle(tiny.engine)


async def test_chat_logprob_bytes_of_a_multi_token_emoji_are_its_utf8(tiny: Server) -> None:
    tok = tiny.engine.tokenizer
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # one character, several tokens: each token is a piece of its UTF-8
    renderer = ChatRenderer.__new__(ChatRenderer)
    renderer.tokenizer = tok
    pieces = [renderer.token_bytes(i, renderer.token_text(i)) for i in ids]
    assert b"".join(bytes(p) for p in pieces) == "🙂".encode()
    assert renderer.token_bytes(tok.encode("hi", add_special_tokens=False)[0], "hi") == list(b"hi")


# -- raw sockets ---------------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="module")
async def strict(tiny_engine: AsyncEngine) -> AsyncIterator[Server]:
    """Short timeouts so slow clients get cut off within the test's bounded waits."""
    server = await start_server(tiny_engine, ServerSettings(keepalive_timeout=0.5, body_timeout=0.5, write_timeout=0.5))
    yield server
    await server.runner.cleanup()


def host_port(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


async def read_all(reader: asyncio.StreamReader, timeout: float = 15.0) -> bytes:
    """Everything until the server closes the connection (bounded)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_http_parser_rejections_are_openai_json(strict: Server) -> None:
    for raw in (b"NOT HTTP AT ALL\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"):
        reader, writer = await asyncio.open_connection(*host_port(strict))
        writer.write(raw)
        await writer.drain()
        reply = await read_all(reader)
        writer.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ")[1].startswith(b"4"), head  # a 4xx, whatever HTTP version the parser saw
        assert b"application/json" in head
        err = json.loads(body)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"


async def test_connections_that_never_finish_their_headers_are_closed(strict: Server) -> None:
    conns = [await asyncio.open_connection(*host_port(strict)) for _ in range(50)]
    for _, writer in conns:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")  # and nothing more
    replies = await asyncio.gather(*(read_all(reader) for reader, _ in conns))
    assert all(r == b"" for r in replies)  # closed by the server, no response
    for _, writer in conns:
        writer.close()


async def test_a_body_that_never_arrives_is_a_408(strict: Server) -> None:
    reader, writer = await asyncio.open_connection(*host_port(strict))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\":")
    reply = await read_all(reader)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_a_stream_nobody_reads_is_aborted_and_its_pages_freed(strict: Server) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny receive window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, host_port(strict))
    body = json.dumps({**LONG, "max_tokens": TINY_MAX_LEN - 10, "logprobs": 20}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    sched = strict.engine.core.scheduler
    try:
        with capture_logs() as logs:
            await asyncio.get_running_loop().sock_sendall(sock, request)
            await wait_for(lambda: len(sched.requests) == 1, what="the request to start")
            # Loopback autotunes the server's send buffer to megabytes, more than this whole stream;
            # pin it small, as a real network's bandwidth-delay product would keep it.
            for conn in strict.runner.server.connections:
                conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            # Never read: the server's writes back up, time out, and the request is aborted long
            # before its ~1000 tokens are done.
            await wait_for(lambda: any(e["event"] == "client stopped reading; aborting its stream" for e in logs),
                           timeout=60, what="the write timeout")
            await wait_until_idle(strict.engine)
        finished = [e for e in logs if e["event"] == "request finished"]
        assert [e["finish_reason"] for e in finished] == ["abort"]
        assert finished[0]["output_tokens"] < TINY_MAX_LEN - 20
    finally:
        sock.close()
    assert not strict.app[STATE].inflight.ids


# -- health, admission ----------------------------------------------------------------------
async def test_health_is_503_while_the_engine_is_stuck(tiny_model_dir: Path, http: aiohttp.ClientSession) -> None:
    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_model_dir), max_model_len=TINY_MAX_LEN,
                                                   kv_cache_memory=8 << 20))
    server = await start_server(engine, ServerSettings(stall_timeout=0.3))
    unstick = threading.Event()
    real_step = engine.core.step

    def stuck_step() -> Any:
        unstick.wait(60)  # bounded: the test sets it
        return real_step()

    async def health() -> int:
        async with http.get(server.url + "/health") as resp:
            return resp.status

    try:
        assert await health() == 200
        engine.core.step = stuck_step  # type: ignore[method-assign]
        with capture_logs() as logs:
            post = asyncio.create_task(http.post(server.url + C, json={"prompt": [5, 6], "max_tokens": 2}))
            statuses: list[int] = []

            async def poll() -> None:
                while not statuses or statuses[-1] != 503:
                    statuses.append(await health())
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(poll(), 20)
            await wait_for(lambda: any(e["event"].startswith("engine stalled") for e in logs), what="the stall log")
        stall = next(e for e in logs if e["event"].startswith("engine stalled"))
        assert stall["in_flight"] == 1 and "kv_pages_used" in stall
        unstick.set()
        resp = await asyncio.wait_for(post, 30)
        assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 2
        assert await health() == 200
    finally:
        unstick.set()
        await server.runner.cleanup()
        await engine.shutdown()


async def test_n_choices_count_against_the_queue_bound(tiny_engine: AsyncEngine, http: aiohttp.ClientSession) -> None:
    server = await start_server(tiny_engine, ServerSettings(max_waiting_requests=8))
    try:
        async with http.post(server.url + C, json={"prompt": [5, 6], "max_tokens": 2, "n": 64}) as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
        assert err["param"] == "n" and "8" in err["message"]
        assert tiny_engine.num_waiting() == 0  # nothing was queued
        async with http.post(server.url + C, json={"prompt": [5, 6], "max_tokens": 2, "n": 8}) as resp:
            assert resp.status == 200 and len((await resp.json())["choices"]) == 8
        await wait_until_idle(tiny_engine)
    finally:
        await server.runner.cleanup()


def sigterm_caught(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
async def test_sigterm_in_the_first_moment_of_start_exits_0(tiny_model_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "serve", "--model", str(tiny_model_dir), "--port", str(free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # As soon as the handler exists (long before torch is imported or the model loads).
        await wait_for(lambda: proc.poll() is not None or sigterm_caught(proc.pid), what="the SIGTERM handler")
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "libtorch" not in f.read()  # still importing: the window that used to exit -15
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
