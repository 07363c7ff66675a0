"""Prefill and decode as real processes on 127.0.0.1, KV over NIXL (DRAM): greedy tokens and their
logprobs identical to the colocated engine (``--batch-invariant``: bit for bit), the side channel's
errors, and ``kill -9`` of either side mid-transfer leaving the survivor's pages all idle. The test
plays the router: it POSTs to D with the room and prefill headers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest
import torch

from conveyor.runtime.tools.serve_process import ServeProcess, start_all

if not any(importlib.util.find_spec(m) for m in ("nixl_cu12", "nixl_cu13")):
    pytest.skip("the pd extra (nixl-cu12; nixl-cu13 on the GPU machine) is not installed", allow_module_level=True)

C = "/v1/completions"
COMMON = ["--max-model-len", "1024", "--kv-cache-memory", "16MiB", "--batch-invariant"]


def worker(model: Path, role: str, *extra: str) -> ServeProcess:
    return ServeProcess(["--model", str(model), "--role", role, *COMMON, *extra])


def _start(*workers: ServeProcess) -> None:
    start_all(workers)


@pytest.fixture(scope="module")
def pd_model(tiny_chat_dir, default_dir, tmp_path_factory):
    """The tiny chat model; on a GPU one of head_dim 64 (the kernels the GPU kit ships), so the same tests
    run the workers on the device with VRAM NIXL."""
    if not torch.cuda.is_available():
        return tiny_chat_dir
    from tests.conftest import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("pd-gpu"), default_dir, hidden=256, heads=4)


@pytest.fixture(scope="module")
def trio(pd_model):
    """P (chunks of 32 tokens), D, and a colocated worker for reference."""
    p = worker(pd_model, "prefill", "--max-num-batched-tokens", "32")
    d = worker(pd_model, "decode")
    c = worker(pd_model, "both")
    try:
        _start(p, d, c)
        yield p, d, c
    finally:
        for w in (p, d, c):
            w.stop(kill=True)


def _room() -> str:
    return uuid.uuid4().hex


def _headers(p: ServeProcess, room: str | None = None) -> dict[str, str]:
    return {"X-Conveyor-Room": room or _room(), "X-Conveyor-Prefill": p.url}


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 40000) for _ in range(n)]


async def _complete(http: aiohttp.ClientSession, url: str, prompt: list[int], headers: dict | None = None,
                    max_tokens: int = 8) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    async with http.post(url + C, json=body, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'conveyor:kv_pages\{[^}]*state="(\w+)"\} (\S+)', text):
        out[f"kv_pages.{m.group(1)}"] = float(m.group(2))
    for m in re.finditer(r'conveyor:kv_transfers_total\{[^}]*result="(\w+)"\} (\S+)', text):
        out[f"transfers.{m.group(1)}"] = float(m.group(2))
    for m in re.finditer(r'conveyor:num_requests_(running|waiting)\{[^}]*\} (\S+)', text):
        out[m.group(1)] = float(m.group(2))
    return out


BUSY = ("kv_pages.private", "kv_pages.sending", "kv_pages.receiving", "kv_pages.quarantined")


def _wait_idle(url: str, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = _metrics(url)
        if all(m.get(k, 0) == 0 for k in BUSY) and m.get("running", 0) == 0:
            return m
        assert time.monotonic() < deadline, f"pages still busy: {m}"
        time.sleep(0.05)


async def test_tokens_bit_identical_to_colocated(trio) -> None:
    p, d, c = trio
    shared = _prompt(48, 9)
    prompts = {"short": _prompt(5, 1), "page": _prompt(16, 2), "chunked": _prompt(150, 3),
               "warm": shared + _prompt(9, 4), "hit": shared + _prompt(7, 5)}
    async with aiohttp.ClientSession() as http:
        want = {k: await _complete(http, c.url, v) for k, v in prompts.items()}
        # One at a time, as the reference ran: on CPU a decode row's logprobs can move in the last
        # bits with what shares its step, even with --batch-invariant (seen colocated too).
        got = {k: await _complete(http, d.url, v, _headers(p)) for k, v in prompts.items()}
        for k in prompts:
            w, g = want[k]["choices"][0], got[k]["choices"][0]
            assert g["text"] == w["text"], k
            assert g["logprobs"]["token_logprobs"] == w["logprobs"]["token_logprobs"], k  # bit for bit
            assert g["finish_reason"] == "length"
        assert got["hit"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 48  # D's cache, not re-sent
        together = await asyncio.gather(*(_complete(http, d.url, prompts[k], _headers(p)) for k in prompts))
        assert [g["choices"][0]["text"] for g in together] == [want[k]["choices"][0]["text"] for k in prompts]

        # Streamed through D (SSE relayed as is by a router): the same text.
        body = {"prompt": prompts["chunked"], "max_tokens": 8, "temperature": 0, "stream": True}
        async with http.post(d.url + C, json=body, headers=_headers(p)) as r:
            assert r.status == 200
            text = ""
            async for line in r.content:
                if line.startswith(b"data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == want["chunked"]["choices"][0]["text"]
    _wait_idle(d.url)
    _wait_idle(p.url)
    assert _metrics(d.url)["transfers.ok"] >= 11


async def test_roles_and_side_channel_errors(trio) -> None:
    p, d, _ = trio
    async with aiohttp.ClientSession() as http:
        for w, role in ((p, "prefill"), (d, "decode")):
            async with http.get(w.url + "/health") as r:
                assert (await r.json()) == {"status": "ok", "role": role}
        body = {"prompt": [5, 6, 7], "max_tokens": 2}
        async with http.post(d.url + C, json=body) as r:  # no room header: 400 naming it
            assert r.status == 400 and (await r.json())["error"]["param"] == "X-Conveyor-Room"
        async with http.post(d.url + C, json=body, headers={"X-Conveyor-Room": _room()}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "X-Conveyor-Prefill"
        async with http.post(p.url + C, json=body) as r:  # P serves no clients
            assert r.status == 400 and (await r.json())["error"]["code"] == "wrong_role"
        room = _room()  # a field D cannot honour disaggregated: a 400 naming it, and the room stays free
        async with http.post(d.url + C, json=body | {"prompt_logprobs": 1}, headers=_headers(p, room)) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "prompt_logprobs"
        async with http.post(d.url + C, json=body, headers=_headers(p, room)) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
        async with http.post(p.url + "/kv/abort", json={"room": _room()}) as r:
            assert r.status == 404
        async with http.post(d.url + "/kv/ready", json={"room": "x"}) as r:
            assert r.status == 404  # D has no side channel
        async with http.post(p.url + "/kv/ready", json={"room": "x"}) as r:
            assert r.status == 400
        ready = {"room": _room(), "agent": "nobody", "token_ids": [1, 2, 3], "params": {}, "first_page": 0,
                 "pages": [1], "lease_s": 5.0}
        async with http.post(p.url + "/kv/ready", json=ready) as r:
            assert r.status == 428 and (await r.json())["error"]["code"] == "peer_unknown"

        # A room still live on D: a second request with it is a 409.
        room = _room()
        long = {"prompt": _prompt(20, 7), "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
        async with http.post(d.url + C, json=long, headers=_headers(p, room)) as first:
            assert first.status == 200
            await first.content.readline()
            async with http.post(d.url + C, json=body, headers=_headers(p, room)) as dup:
                assert dup.status == 409 and (await dup.json())["error"]["code"] == "duplicate_room"
        # Leaving the stream early was a client abort: everything comes back.
    _wait_idle(d.url)
    _wait_idle(p.url)


async def test_chaos_random_client_aborts(trio) -> None:
    """200 requests at once, a third of them abandoned by their client at a random moment (queued on
    D, awaiting KV, prefilling, sending, decoding): survivors get the colocated tokens, nothing leaks."""
    p, d, c = trio
    rng = random.Random(0)
    n = 200
    prompts = [_prompt(rng.randrange(3, 300), 1000 + i) for i in range(n)]
    aborted = set(rng.sample(range(n), n // 3))
    async with aiohttp.ClientSession() as http:
        # Batch-invariant workers (COMMON): the colocated answers do not depend on what runs beside them.
        done = await asyncio.gather(*(_complete(http, c.url, pr) for pr in prompts))
        want = [r["choices"][0]["text"] for r in done]

        async def one(i: int) -> str | None:
            body = {"prompt": prompts[i], "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0}
            async with http.post(d.url + C, json=body, headers=_headers(p)) as r:
                assert r.status == 200, await r.text()
                if not body["stream"]:
                    return (await r.json())["choices"][0]["text"]
                text = ""
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                return text

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        for i in sorted(aborted, key=lambda _: rng.random()):
            await asyncio.sleep(rng.uniform(0, 0.05))
            tasks[i].cancel()  # the client goes away: aiohttp closes its connection to D
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    for i, (res, text) in enumerate(zip(results, want)):
        if isinstance(res, asyncio.CancelledError):
            assert i in aborted
            continue
        assert res == text, i
    await asyncio.to_thread(_wait_idle, d.url, 30)
    await asyncio.to_thread(_wait_idle, p.url, 30)


async def _long_requests(http: aiohttp.ClientSession, p: ServeProcess, d: ServeProcess, n: int) -> list[asyncio.Task]:
    async def one(i: int) -> int:
        body = {"prompt": _prompt(1000, 100 + i), "max_tokens": 4, "temperature": 0}
        try:
            async with http.post(d.url + C, json=body, headers=_headers(p)) as r:
                await r.read()
                return r.status
        except aiohttp.ClientError:
            return -1

    return [asyncio.create_task(one(i)) for i in range(n)]


def _wait_sending(p: ServeProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _metrics(p.url).get("kv_pages.sending", 0) == 0:
        assert time.monotonic() < deadline, "P never started sending"
        time.sleep(0.02)


async def test_kill_each_side_mid_transfer(trio, pd_model) -> None:
    """kill -9 of D while P pushes (P's WRITEs fail, P frees), then of P while a fresh D receives (D
    fails its rooms at once and frees): the survivor's pages all back to free/cached."""
    p, d, _ = trio
    async with aiohttp.ClientSession() as http:
        tasks = await _long_requests(http, p, d, 4)
        await asyncio.to_thread(_wait_sending, p)
        os.kill(d.proc.pid, signal.SIGKILL)
        statuses = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        # The connection to D died with it (a room that finished first answered before the kill).
        assert set(statuses) <= {200, -1} and -1 in statuses, statuses
        m = await asyncio.to_thread(_wait_idle, p.url, 30)
        assert m["transfers.error"] + m["transfers.aborted"] + m["transfers.expired"] >= 1

        d2 = worker(pd_model, "decode", "--kv-lease-s", "20")
        try:
            await asyncio.to_thread(_start, d2)
            tasks = await _long_requests(http, p, d2, 4)
            await asyncio.to_thread(_wait_sending, p)
            assert _metrics(d2.url)["kv_pages.receiving"] > 0
            os.kill(p.proc.pid, signal.SIGKILL)
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert set(statuses) <= {200, 503} and 503 in statuses, statuses  # a clean error, never a hang
            m = await asyncio.to_thread(_wait_idle, d2.url, 15)
            assert m["transfers.peer_dead"] >= 1
        finally:
            d2.stop(kill=True)
