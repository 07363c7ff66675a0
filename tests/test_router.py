"""``conveyor router``: the prefix tree and policy alone; then real ``conveyor serve`` workers on
127.0.0.1 behind a router (same greedy tokens, prefix-aware and least-load routing, failover,
client disconnects); ``--launch 2`` as a real process; and the PD contract against a fake D.

Workers are started and stopped by PID; every wait polls a condition under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from conveyor.runtime.router import PolicyConfig, RouterSettings, build_router_app
from conveyor.runtime.router.keys import routing_key
from conveyor.runtime.router.launcher import (
    ChildSpec,
    Launcher,
    assign_gpus,
    free_port,
    parse_launch,
    plan_children,
    tensor_parallel_size,
    visible_gpus,
)
from conveyor.runtime.router.policy import CacheAwarePolicy
from conveyor.runtime.router.prefix_tree import PrefixTree
from conveyor.runtime.router.workers import Worker
from conveyor.runtime.tools.serve_process import ServeProcess, start_all

ROOT = Path(__file__).resolve().parent.parent
ENGINE_ARGS = ["--max-model-len", "2048", "--kv-cache-memory", "8MiB"]
C, CHAT = "/v1/completions", "/v1/chat/completions"


# -- the pieces alone -----------------------------------------------------------------------
def test_prefix_tree_matches_splits_and_forgets_least_recent_first() -> None:
    t = PrefixTree(max_chars=100)
    t.insert("hello world")
    t.insert("hello there")  # splits the edge at "hello "
    assert (t.match("hello world!"), t.match("hello th"), t.match("help"), t.match("x")) == (11, 8, 3, 0)
    assert t.size == len("hello ") + len("world") + len("there")
    t.insert("a" * 60)
    t.match("hello there")  # "there" is now more recent than "world"
    t.insert("b" * 40)  # over 100: evicts down to 90, least recently used leaves first
    assert t.size <= 90
    assert t.match("hello world") == len("hello ") and t.match("hello there") == 11
    assert t.match("b" * 40) == 40


def _workers(n: int) -> list[Worker]:
    return [Worker(f"http://w{i}", "both", PrefixTree(10_000), healthy=True) for i in range(n)]


def test_policy_prefix_hit_least_load_and_imbalance() -> None:
    policy = CacheAwarePolicy(PolicyConfig(cache_threshold=0.5, balance_abs=2, balance_rel=1.5))
    w = _workers(2)
    prefix = "You are a careful assistant. " * 4
    first = policy.choose(w, prefix + "one")
    assert first.reason == "least_load" and first.worker is w[0]
    assert policy.choose(w, prefix + "two") == (w[0], "prefix_hit", len(prefix))
    # Unrelated text: the least loaded, then (loads equal) the one with the smaller tree.
    assert policy.choose(w, "zzz unrelated").worker is w[1]
    w[1].in_flight = 1
    assert policy.choose(w, "qqq other").worker is w[0]
    # Imbalanced (difference > 2 and ratio > 1.5): the prefix owner is skipped for the idlest.
    w[0].in_flight, w[1].in_flight = 5, 1
    assert policy.choose(w, prefix + "three")[:2] == (w[1], "imbalance")
    w[0].in_flight = 3  # difference 2: balanced again, a prefix hit; both have seen it now, the idler wins
    assert policy.choose(w, prefix + "four")[:2] == (w[1], "prefix_hit")
    w[1].in_flight = 3
    assert policy.choose(w, prefix + "two!")[:2] == (w[0], "prefix_hit")  # the longer match wins


def test_routing_keys() -> None:
    assert routing_key(C, {"prompt": "abc"}) == "abc"
    assert routing_key(C, {"prompt": [1, 23]}) == "1 23 "
    assert routing_key(C, {"prompt": ["first", "second"]}) == "first"
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "U"}]}]}
    assert routing_key(CHAT, chat) == "<system>\nS\n<user>\nU"
    assert routing_key(C, None) == routing_key(C, {"prompt": 5}) == ""


def test_launch_plans() -> None:
    assert parse_launch("2") == ["both", "both"]
    assert parse_launch("1p2d") == ["prefill", "decode", "decode"]
    for bad in ("0", "p1d", "1p0d", "two"):
        with pytest.raises(ValueError):
            parse_launch(bad)
    specs = plan_children(["both", "prefill"], ["--model", "m", "--device", "cpu"])
    assert specs[0].argv[1:5] == ["-m", "conveyor", "serve", "--host"] and "--role" not in specs[0].argv
    assert specs[1].argv[-6:] == ["--role", "prefill", "--model", "m", "--device", "cpu"]
    assert specs[0].port != specs[1].port


def test_launched_workers_get_their_own_gpus_when_there_are_enough(monkeypatch) -> None:
    assert tensor_parallel_size(["--model", "m"]) == 1
    assert tensor_parallel_size(["-tp", "2"]) == tensor_parallel_size(["--tensor-parallel-size=2"]) == 2
    assert assign_gpus(2, 1, ["0", "1"]) == ["0", "1"]
    assert assign_gpus(2, 2, ["4", "5", "6", "7"]) == ["4,5", "6,7"]  # a TP=2 worker: two consecutive GPUs
    assert assign_gpus(2, 1, ["0"]) == [None, None]  # one GPU for 1p1d: they share it
    assert assign_gpus(2, 1, []) == [None, None]  # no GPU (CPU workers)
    specs = plan_children(["prefill", "decode"], ["--model", "m", "-tp", "2"], ["0", "1", "2", "3"])
    assert [s.gpus for s in specs] == ["0,1", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


async def test_a_launched_child_runs_with_its_gpu_share(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    script = f"import os; open({str(seen)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"
    launcher = Launcher([ChildSpec("both", free_port(), [sys.executable, "-c", script], "7")], stop_timeout=10)
    await launcher.start()
    try:
        rc = await asyncio.wait_for(next(iter(launcher.procs.values())).wait(), 30)
    finally:
        await launcher.stop()  # SIGTERM, then SIGKILL past stop_timeout: nothing outlives the test
    assert rc == 0 and seen.read_text() == "7"


def test_settings_refuse_mixed_and_half_pd() -> None:
    with pytest.raises(ValueError, match="both --prefill and --decode"):
        RouterSettings(prefill=("a:1",))
    with pytest.raises(ValueError, match="without --prefill"):
        RouterSettings(workers=("a:1",), prefill=("b:1",), decode=("c:1",))
    with pytest.raises(ValueError, match="listed twice"):
        RouterSettings(workers=("a:1", "http://a:1/"))


# -- helpers for real processes ---------------------------------------------------------------
def start_workers(model: Path, tmp: Path, n: int) -> list[ServeProcess]:
    workers = [ServeProcess(["--model", str(model), *ENGINE_ARGS], log=tmp / f"worker{i}.log") for i in range(n)]
    start_all(workers, timeout_s=120)
    return workers


def stop_all(workers: list[ServeProcess]) -> None:
    for w in workers:  # all at once: each drains on its own
        w.terminate()
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def pair(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServeProcess]]:
    workers = start_workers(tiny_chat_dir, tmp_path_factory.mktemp("pair"), 2)
    yield workers
    stop_all(workers)


class Router:
    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner, self.url = runner, url


async def start_router(settings: RouterSettings) -> Router:
    port = free_port()
    settings = RouterSettings(**{**{f: getattr(settings, f) for f in settings.__struct_fields__}, "port": port})
    runner = web.AppRunner(build_router_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Router(runner, f"http://127.0.0.1:{port}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def router(pair: list[ServeProcess]) -> AsyncIterator[Router]:
    r = await start_router(RouterSettings(workers=tuple(w.url for w in pair), health_interval=0.2))
    yield r
    await r.runner.cleanup()


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def series(m: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and labels.items() <= dict(lab).items())


async def until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def first_event(resp: aiohttp.ClientResponse) -> bytes:
    buf = b""
    while b"\n\n" not in buf:
        piece = await resp.content.readany()
        assert piece, "stream ended before its first event"
        buf += piece
    return buf


# -- replicas ---------------------------------------------------------------------------------
async def test_same_greedy_tokens_as_a_worker_hit_directly(pair: list[ServeProcess], router: Router) -> None:
    from openai import AsyncOpenAI

    via = AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=60)
    direct = AsyncOpenAI(base_url=pair[1].url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = (await via.models.list()).data[0].id
    kw: dict[str, Any] = {"model": model, "max_tokens": 12, "temperature": 0}
    msgs = [{"role": "user", "content": "Name three rivers."}]
    got = []
    for client in (via, direct):
        comp = await client.completions.create(prompt="The quick brown fox", logprobs=1, **kw)
        chat = await client.chat.completions.create(messages=msgs, **kw)
        stream = await client.completions.create(prompt="The quick brown fox", stream=True, **kw)
        comp_stream = "".join([c.choices[0].text async for c in stream])
        stream = await client.chat.completions.create(messages=msgs, stream=True, **kw)
        chat_stream = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        got.append((comp.choices[0].text, comp.choices[0].logprobs.tokens, comp.usage.completion_tokens,
                    chat.choices[0].message.content, comp_stream, chat_stream))
    assert got[0] == got[1]
    assert got[0][2] == 12 and got[0][0] == got[0][4] and got[0][3] == got[0][5]


async def test_a_shared_prefix_goes_to_one_worker(pair: list[ServeProcess], router: Router,
                                                  http: aiohttp.ClientSession) -> None:
    prefix = "You are a meticulous librarian who catalogues every book by author, year and shelf. " * 4
    before = {w.url: await scrape(http, w.url) for w in pair}
    for i in range(4):
        async with http.post(router.url + C, json={"prompt": prefix + f"Question {i}: where?", "max_tokens": 2,
                                                   "temperature": 0}) as resp:
            assert resp.status == 200
    m = await scrape(http, router.url)
    assert series(m, "conveyor:router_routing_decisions_total", reason="prefix_hit") == 3
    counts = [series(m, "conveyor:router_requests_total", worker=w.url, outcome="ok") for w in pair]
    assert sorted(counts) == [0, 4], counts
    owner = pair[counts.index(4)]
    other = pair[1 - counts.index(4)]
    # The workers' own counters, read through the router's aggregate: the owner reused the prefix.
    hits = {w.url: series(m, "conveyor:prefix_cache_hits_total", worker=w.url)
            - series(before[w.url], "conveyor:prefix_cache_hits_total") for w in pair}
    assert hits[owner.url] >= 3 * 16 and hits[other.url] == 0, hits


async def test_least_load_spreads_concurrent_unrelated_requests(pair: list[ServeProcess], router: Router,
                                                                http: aiohttp.ClientSession) -> None:
    prompts = ["Alpha centauri is", "Bravo, said the crowd", "Charlie went fishing", "Delta of the river"]
    streams = []
    try:
        for p in prompts:  # each opened while the earlier ones still stream
            resp = await http.post(router.url + C, json={"prompt": p, "max_tokens": 1500, "stream": True,
                                                         "ignore_eos": True})
            assert resp.status == 200
            streams.append(resp)
            await first_event(resp)
        m = await scrape(http, router.url)
        assert [series(m, "conveyor:router_in_flight", worker=w.url) for w in pair] == [2, 2]
        assert series(m, "conveyor:router_routing_decisions_total", reason="least_load") == 4
        assert [series(m, "conveyor:num_requests_running", worker=w.url) for w in pair] == [2, 2]
    finally:
        for resp in streams:
            resp.close()

    async def idle() -> bool:
        m = await scrape(http, router.url)
        return all(series(m, "conveyor:num_requests_running", worker=w.url) == 0 for w in pair) and \
            series(m, "conveyor:router_in_flight") == 0

    await until(idle, what="workers idle after the clients left")


async def test_client_disconnect_mid_stream_aborts_on_the_worker(pair: list[ServeProcess], router: Router,
                                                                 http: aiohttp.ClientSession) -> None:
    before = await scrape(http, router.url)
    resp = await http.post(router.url + CHAT, json={"messages": [{"role": "user", "content": "Tell a long story"}],
                                                    "max_tokens": 1500, "stream": True, "ignore_eos": True})
    assert resp.status == 200
    await first_event(resp)
    resp.close()  # the client goes away mid-stream

    async def aborted() -> bool:
        m = await scrape(http, router.url)
        return (series(m, "conveyor:request_success_total", finished_reason="abort")
                - series(before, "conveyor:request_success_total", finished_reason="abort")) == 1 \
            and series(m, "conveyor:num_requests_running") == 0 and series(m, "conveyor:router_in_flight") == 0

    await until(aborted, what="the worker to abort the request")
    m = await scrape(http, router.url)
    assert series(m, "conveyor:router_requests_total", outcome="client_disconnect") == 1


async def test_a_killed_worker_is_taken_out_then_all_dead_is_503(tiny_chat_dir: Path, tmp_path: Path,
                                                                 http: aiohttp.ClientSession) -> None:
    workers = start_workers(tiny_chat_dir, tmp_path, 2)
    r = await start_router(RouterSettings(workers=tuple(w.url for w in workers), health_interval=0.2))
    try:
        os.kill(workers[0].proc.pid, signal.SIGKILL)
        workers[0].proc.wait(10)
        for i in range(4):  # at once: a refused connection is retried on the other worker
            async with http.post(r.url + C, json={"prompt": f"hello {i}", "max_tokens": 2}) as resp:
                assert resp.status == 200

        async def taken_out() -> bool:
            async with http.get(r.url + "/health") as resp:
                body = await resp.json()
                return resp.status == 200 and [w["healthy"] for w in body["workers"]] == [False, True]

        await until(taken_out, what="the killed worker marked unhealthy")
        m = await scrape(http, r.url)
        assert series(m, "conveyor:router_requests_total", worker=workers[1].url, outcome="ok") == 4
        assert series(m, "conveyor:router_worker_healthy", worker=workers[0].url) == 0

        os.kill(workers[1].proc.pid, signal.SIGKILL)
        workers[1].proc.wait(10)

        async def all_out() -> bool:
            async with http.get(r.url + "/health") as resp:
                return resp.status == 503
        await until(all_out, what="/health 503 with no worker left")
        async with http.get(r.url + "/health") as resp:
            assert resp.headers["Retry-After"] == "1" and "No healthy worker" in (await resp.json())["error"]["message"]
        async with http.post(r.url + C, json={"prompt": "hello", "max_tokens": 2}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "no_healthy_worker"
    finally:
        await r.runner.cleanup()
        stop_all(workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes: it holds no port and runs nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class LaunchedRouter(NamedTuple):
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    pids: list[int]  # the children it started


@contextlib.asynccontextmanager
async def launched_router(launch: str, model: Path, tmp_path: Path,
                          http: aiohttp.ClientSession) -> AsyncIterator[LaunchedRouter]:
    """``conveyor router --launch ...`` as a real process, healthy with every child up; killed with its
    children on the way out, whatever the test did."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "router.log"
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "router", "--launch", launch, "--model", str(model),
                             "--port", str(port), "--health-interval", "0.2", *ENGINE_ARGS],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pids: list[int] = []
    try:
        async def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                async with http.get(url + "/health") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await until(healthy, timeout=120, what=f"the router and its workers ({launch})")
        pids.extend(rec["pid"] for rec in log_records(log) if rec["event"] == "worker started")
        yield LaunchedRouter(proc, url, log, pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def log_records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def test_launch_2_serves_and_stops_every_child_on_sigterm(tiny_chat_dir: Path, tmp_path: Path,
                                                                http: aiohttp.ClientSession) -> None:
    async with launched_router("2", tiny_chat_dir, tmp_path, http) as r:
        url, pids = r.url, r.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        async with http.post(url + C, json={"prompt": "hello", "max_tokens": 3}) as resp:
            assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 3

        os.kill(pids[0], signal.SIGKILL)  # a child dies: logged, reported, the other one serves

        async def reported() -> bool:
            async with http.get(url + "/health") as resp:
                reasons = [w["reason"] for w in (await resp.json())["workers"]]
                return resp.status == 200 and "exited with code -9" in reasons[0] and reasons[1] == "ok"

        await until(reported, what="the dead child reported")
        assert any(rec.get("event") == "worker process exited" and rec.get("pid") == pids[0]
                   for rec in log_records(r.log))
        async with http.post(url + C, json={"prompt": "hello", "max_tokens": 3}) as resp:
            assert resp.status == 200, (await resp.text(), r.log.read_text()[-3000:])
        r.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(r.proc.wait), 60) == 0, r.log.read_text()[-3000:]

        async def children_gone() -> bool:
            return not any(_alive(p) for p in pids)

        await until(children_gone, timeout=10, what="every child to exit")


async def test_launch_1p1d_streams_through_the_router_with_the_colocated_tokens(
        pair: list[ServeProcess], tiny_chat_dir: Path, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Three processes (router, P, D) from one command; the openai client streams through the router; KV goes
    P -> D over NIXL; greedy tokens equal a colocated worker's; every page idle on both workers afterwards."""
    pytest.importorskip("nixl_cu12", reason="the pd extra (nixl-cu12) is not installed")
    from openai import AsyncOpenAI

    async with launched_router("1p1d", tiny_chat_dir, tmp_path, http) as r:
        assert len(r.pids) == 2
        kw: dict[str, Any] = {"max_tokens": 12, "temperature": 0}
        prompts = ["The quick brown fox", "x" * 40 + " and then", "Tell me about rivers. " * 6]  # < 1, > 1 page
        got: dict[str, list[str]] = {}
        for name, base in (("pd", r.url), ("colocated", pair[0].url)):
            client = AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
            model = (await client.models.list()).data[0].id
            texts = []
            for prompt in prompts:
                stream = await client.completions.create(model=model, prompt=prompt, stream=True, **kw)
                texts.append("".join([c.choices[0].text async for c in stream]))
            chat = await client.chat.completions.create(model=model, stream=True, **kw,
                                                        messages=[{"role": "user", "content": "Name three rivers."}])
            texts.append("".join([c.choices[0].delta.content or "" async for c in chat]))
            got[name] = texts
        assert got["pd"] == got["colocated"] and all(got["pd"])

        async def idle() -> bool:  # both workers' pages back to free or cached, through the router's scrape
            m = await scrape(http, r.url)
            busy = sum(series(m, "conveyor:kv_pages", state=s) for s in ("sending", "receiving", "quarantined"))
            return busy == 0 and series(m, "conveyor:kv_transfers_total", result="ok") >= len(prompts) + 1

        await until(idle, what="every kv page idle and the transfers counted")
        r.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(r.proc.wait), 60) == 0, r.log.read_text()[-3000:]


def test_launch_fails_cleanly_when_a_child_dies_starting(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "router", "--launch", "2", "--port", str(free_port()),
                             "--no-such-engine-flag"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    records = log_records(log)
    pids = [r["pid"] for r in records if r["event"] == "worker started"]
    survivors = [p for p in pids if _alive(p)]
    for p in survivors:  # a failing check must not leave them running for the rest of CI
        os.kill(p, signal.SIGKILL)
    assert len(pids) == 2 and not survivors
    failed = next(r for r in records if r["event"] == "workers did not start")
    assert "exited with code 2" in failed["reason"]


def test_router_help_needs_no_torch() -> None:
    code = ("import atexit, sys; atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'));"
            "from runtime.cli import main; main(['router', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "--launch" in out.stdout and out.stdout.strip().endswith("NO-TORCH")


# -- PD contract, against a fake D -------------------------------------------------------------
CANNED = [b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
          b'data: {"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"stop"}]}\n\n',
          b"data: [DONE]\n\n"]


class FakeWorker:
    """A worker that says its role on /health; as D it records what arrives and answers canned bytes."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.closed = asyncio.Event()  # a held stream's connection went away
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post(C, self.generate)
        app.router.add_post(CHAT, self.generate)
        self.runner = web.AppRunner(app, handler_cancellation=True)

    async def start(self) -> FakeWorker:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": self.role})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append((request.path, dict(request.headers), raw))
        body = json.loads(raw)
        if body.get("max_tokens") == 0:
            return web.json_response({"error": {"message": "room already exists", "code": "duplicate_room"}},
                                     status=409)
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "Hi there"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in CANNED[:1] if body.get("max_tokens") in (998, 999) else CANNED:
            await resp.write(chunk)
        if body.get("max_tokens") == 998:  # dies mid-stream
            assert request.transport is not None
            request.transport.close()
            return resp
        if body.get("max_tokens") == 999:  # hold the stream open until the router lets go
            try:
                await asyncio.wait_for(asyncio.Event().wait(), 30)
            except asyncio.CancelledError:
                self.closed.set()
                raise
        return resp


async def test_pd_sends_the_request_to_d_with_a_fresh_room_and_relays_bytes(http: aiohttp.ClientSession) -> None:
    p, d = await FakeWorker("prefill").start(), await FakeWorker("decode").start()
    r = await start_router(RouterSettings(prefill=(p.url,), decode=(d.url,), health_interval=0.2))
    try:
        async with http.get(r.url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["mode"] == "pd"
        sent = []
        for i, path in enumerate([CHAT, C, CHAT]):
            raw = json.dumps({"messages" if path == CHAT else "prompt": "x" * i, "stream": True,
                              "max_tokens": 5}).encode()
            sent.append((path, raw))
            async with http.post(r.url + path, data=raw, headers={"Content-Type": "application/json",
                                                                  "X-Conveyor-Room": "forged"}) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                assert await resp.read() == b"".join(CANNED)  # byte for byte
        rooms = [h["X-Conveyor-Room"] for _, h, _ in d.seen]
        assert all(re.fullmatch(r"[0-9a-f]{32}", room) for room in rooms) and len(set(rooms)) == 3
        assert all(h["X-Conveyor-Prefill"] == p.url for _, h, _ in d.seen)
        assert [(path, raw) for path, _, raw in d.seen] == sent  # the client's path and body, unchanged
        assert not p.seen  # P hears of a request from D only

        async with http.post(r.url + C, json={"prompt": "x", "max_tokens": 5}) as resp:
            assert resp.status == 200 and await resp.json() == {"choices": [{"text": "Hi there"}]}
        async with http.post(r.url + C, json={"prompt": "x", "max_tokens": 0}) as resp:  # D's 4xx, as it is
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "duplicate_room"
        assert len(d.seen) == 5  # not retried elsewhere

        # D dies mid-stream: the client's stream ends the way a worker ends a failure, not cut off.
        async with http.post(r.url + CHAT, json={"messages": [], "stream": True, "max_tokens": 998}) as resp:
            raw = await resp.read()
        head, error, done = raw.split(b"\n\n")[:3]
        assert head + b"\n\n" == CANNED[0] and done == b"data: [DONE]"
        assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == "worker_failed"

        # The client leaves mid-stream: the router closes its connection to D at once.
        resp = await http.post(r.url + CHAT, json={"messages": [], "stream": True, "max_tokens": 999})
        assert await first_event(resp) == CANNED[0]
        m = await scrape(http, r.url)  # D answers: P's part is over, so is its load; D's goes on
        assert series(m, "conveyor:router_in_flight", role="prefill") == 0
        assert series(m, "conveyor:router_in_flight", role="decode") == 1
        resp.close()
        await asyncio.wait_for(d.closed.wait(), 10)
        m = await scrape(http, r.url)
        assert series(m, "conveyor:router_requests_total", outcome="client_disconnect") == 1
        assert series(m, "conveyor:router_in_flight") == 0
        assert series(m, "conveyor:router_requests_total", outcome="upstream_error") == 1
        assert series(m, "conveyor:router_routing_decisions_total", role="prefill") == 7
    finally:
        await r.runner.cleanup()
        await p.runner.cleanup()
        await d.runner.cleanup()


async def test_pd_roles_are_checked_and_missing_ones_named(http: aiohttp.ClientSession) -> None:
    p, d = await FakeWorker("prefill").start(), await FakeWorker("decode").start()
    r = await start_router(RouterSettings(prefill=(d.url,), decode=(p.url,), health_interval=0.2))  # swapped
    try:
        async with http.get(r.url + "/health") as resp:
            body = await resp.json()
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert "prefill" in body["error"]["message"] and "decode" in body["error"]["message"]
            assert all("role mismatch" in w["reason"] for w in body["workers"])
        async with http.post(r.url + C, json={"prompt": "x"}) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_healthy_worker"
        assert not p.seen and not d.seen
    finally:
        await r.runner.cleanup()
        await p.runner.cleanup()
        await d.runner.cleanup()
