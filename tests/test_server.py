"""The OpenAI-compatible server, over loopback HTTP, against a real engine.

Most tests use a tiny random Llama that has the default model's tokenizer (fast, and it has a
chat template); the client-compatibility and stop-string tests use the default model, whose
answers are checkable. Every test that touches the engine ends by waiting (bounded polling)
until the engine holds no request and every KV page is free, then runs the integrity check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
import torch
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import STATE, ServerSettings, build_app
from conveyor.runtime.server.serve import make_runner
from conveyor.runtime.tools.serve_process import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

TINY_MAX_LEN = 1024


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conveyor.model.default_model import default_model_dir

    out = tmp_path_factory.mktemp("tiny-chat")
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    src = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@dataclass
class Server:
    engine: AsyncEngine
    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def model(self) -> str:
        return self.engine.model_name


async def start_server(engine: AsyncEngine, settings: ServerSettings, *, handler_cancellation: bool = True) -> Server:
    app = build_app(engine, settings)
    runner = make_runner(app) if handler_cancellation else web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Server(engine, app, runner, f"http://127.0.0.1:{port}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny_engine(tiny_model_dir: Path) -> AsyncIterator[AsyncEngine]:
    engine = await AsyncEngine.create(EngineConfig(
        model=str(tiny_model_dir), max_model_len=TINY_MAX_LEN, kv_cache_memory=8 << 20, max_num_seqs=16,
    ))
    yield engine
    await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny(tiny_engine: AsyncEngine) -> AsyncIterator[Server]:
    server = await start_server(tiny_engine, ServerSettings(max_request_body=1 << 20))
    yield server
    await server.runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smol() -> AsyncIterator[Server]:
    engine = await AsyncEngine.create(EngineConfig(model="default", max_model_len=1024, kv_cache_memory=64 << 20))
    server = await start_server(engine, ServerSettings())
    yield server
    await server.runner.cleanup()
    await engine.shutdown()


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def wait_until_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Poll (short awaits, bounded) until the engine holds no request and every page is free."""
    sched = engine.core.scheduler
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sched.requests or sched.kv.num_available_pages != sched.kv.total_pages:
        if loop.time() > deadline:
            raise AssertionError(
                f"engine not idle after {timeout}s: {len(sched.requests)} requests, "
                f"{sched.kv.num_available_pages}/{sched.kv.total_pages} pages available"
            )
        await asyncio.sleep(0.005)
    sched.check_integrity()


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The data payloads of a server-sent event stream, checking the framing as it goes."""
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            yield event[len(b"data: "):]
    assert buf == b"", f"trailing bytes after the last event: {buf!r}"


async def collect(events: AsyncIterator[bytes]) -> list[bytes]:
    return [e async for e in events]


async def metrics(session: aiohttp.ClientSession, server: Server) -> dict[tuple[str, tuple], float]:
    """One scrape as {(name, labels): value}; every series must name the model, which is then dropped."""
    async with session.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert s.labels.get("model_name") == server.model, (s.name, s.labels)
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def prompt_len(engine: AsyncEngine, text: str) -> int:
    return len(engine.tokenizer.encode(text))


# -- the official client --------------------------------------------------------------------
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


async def test_openai_async_client(smol: Server) -> None:
    client = openai.AsyncOpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(model=smol.model, messages=FRANCE, temperature=0, max_tokens=20)
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 10

    parts = []
    stream = await client.chat.completions.create(model=smol.model, messages=FRANCE, temperature=0, max_tokens=20,
                                                  stream=True, stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    lp = await client.chat.completions.create(model=smol.model, messages=FRANCE, temperature=0, max_tokens=5,
                                              logprobs=True, top_logprobs=2)
    tokens = lp.choices[0].logprobs.content
    assert len(tokens) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    assert "".join(t.token for t in tokens) == lp.choices[0].message.content

    comp = await client.completions.create(model=smol.model, prompt="The capital of France is", temperature=0,
                                           max_tokens=8)
    assert "Paris" in comp.choices[0].text
    assert comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length"
    text = ""
    async for chunk in await client.completions.create(model=smol.model, prompt="The capital of France is",
                                                       temperature=0, max_tokens=8, stream=True):
        text += chunk.choices[0].text
    assert text == comp.choices[0].text
    await client.close()
    await wait_until_idle(smol.engine)


async def test_openai_sync_client(smol: Server) -> None:
    def run() -> tuple[str, str, str, str]:
        with openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0) as client:
            chat = client.chat.completions.create(model=smol.model, messages=FRANCE, temperature=0, max_tokens=20)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=smol.model, messages=FRANCE, temperature=0, max_tokens=20, stream=True) if c.choices)
            comp = client.completions.create(model=smol.model, prompt="The capital of France is", temperature=0,
                                             max_tokens=8)
            comp_streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=smol.model, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True))
            models = [m.id for m in client.models.list()]
            assert models == [smol.model]
            return chat.choices[0].message.content, streamed, comp.choices[0].text, comp_streamed

    # The sync client blocks, so it runs in a worker thread while this loop serves it.
    chat, streamed, comp, comp_streamed = await asyncio.to_thread(run)
    assert "Paris" in chat and streamed == chat
    assert "Paris" in comp and comp_streamed == comp
    await wait_until_idle(smol.engine)


async def test_openai_client_errors(smol: Server) -> None:
    client = openai.AsyncOpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=smol.model, messages=FRANCE, max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    await client.close()
    await wait_until_idle(smol.engine)


async def test_stop_string(smol: Server, http: aiohttp.ClientSession) -> None:
    body = {"model": smol.model, "messages": FRANCE, "temperature": 0, "max_tokens": 20, "stop": ["Paris"]}
    async with http.post(smol.url + "/v1/chat/completions", json=body) as resp:
        out = await resp.json()
    choice = out["choices"][0]
    assert choice["message"]["content"] == "The capital of France is "
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "Paris"
    # A single string is accepted as well as a list.
    async with http.post(smol.url + "/v1/chat/completions", json={**body, "stop": " France"}) as resp:
        out = await resp.json()
    assert out["choices"][0]["message"]["content"] == "The capital of"
    await wait_until_idle(smol.engine)


# -- responses, streams, usage --------------------------------------------------------------
async def test_usage_counts_and_stream_matches(tiny: Server, http: aiohttp.ClientSession) -> None:
    prompt = "Once upon a time there was"
    body = {"model": tiny.model, "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    async with http.post(tiny.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        full = await resp.json()
    n_prompt = prompt_len(tiny.engine, prompt)
    assert full["object"] == "text_completion" and full["model"] == tiny.model
    assert full["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 7, "total_tokens": n_prompt + 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # shorter than one KV page
    assert full["choices"][0]["finish_reason"] == "length"

    async with http.post(tiny.url + "/v1/completions",
                         json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = [e async for e in sse_events(resp)]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *deltas, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(c["usage"] is None for c in deltas)
    assert "".join(c["choices"][0]["text"] for c in deltas) == full["choices"][0]["text"]
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas[:-1])

    # Token-id prompts count exactly their ids.
    async with http.post(tiny.url + "/v1/completions", json={**body, "prompt": [5, 6, 7, 8]}) as resp:
        assert (await resp.json())["usage"]["prompt_tokens"] == 4
    await wait_until_idle(tiny.engine)


async def test_chat_sse_framing_bytewise(tiny: Server, http: aiohttp.ClientSession) -> None:
    body = {"messages": FRANCE, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True}
    async with http.post(tiny.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"  # the body ends "data: [DONE]\n\n"
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events[:-2])
    chunks = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(set(c["choices"][0]["delta"]) <= {"content"} for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    await wait_until_idle(tiny.engine)


async def test_n_choices_and_prompt_lists(tiny: Server, http: aiohttp.ClientSession) -> None:
    base = {"model": tiny.model, "max_tokens": 5, "temperature": 1.0, "ignore_eos": True}
    async with http.post(tiny.url + "/v1/completions", json={**base, "prompt": "Hello", "n": 2, "seed": 11}) as resp:
        two = await resp.json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] == 10
    assert two["usage"]["prompt_tokens"] == prompt_len(tiny.engine, "Hello")  # the shared prompt counts once
    # Choice i samples with seed + i: choice 1 of seed 11 replays choice 0 of seed 12.
    async with http.post(tiny.url + "/v1/completions", json={**base, "prompt": "Hello", "seed": 12}) as resp:
        one = await resp.json()
    assert one["choices"][0]["text"] == two["choices"][1]["text"]

    prompts = ["Hello", "A much longer prompt than the first"]
    async with http.post(tiny.url + "/v1/completions", json={**base, "prompt": prompts, "n": 2}) as resp:
        four = await resp.json()
    assert [c["index"] for c in four["choices"]] == [0, 1, 2, 3]
    assert four["usage"]["prompt_tokens"] == sum(prompt_len(tiny.engine, p) for p in prompts)
    assert four["usage"]["completion_tokens"] == 20

    body = {**base, "messages": FRANCE, "n": 3, "stream": True, "stream_options": {"include_usage": True}}
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes: dict[int, str] = {}
    async with http.post(tiny.url + "/v1/chat/completions", json=body) as resp:
        async for event in sse_events(resp):
            if event == b"[DONE]":
                break
            chunk = json.loads(event)
            for c in chunk["choices"]:
                texts[c["index"]] += c["delta"].get("content", "")
                if c["finish_reason"]:
                    finishes[c["index"]] = c["finish_reason"]
            usage = chunk["usage"]
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert all(texts.values()) and usage["completion_tokens"] == 15
    await wait_until_idle(tiny.engine)


async def test_token_id_batches_and_null_fields(tiny: Server, http: aiohttp.ClientSession) -> None:
    # Unknown field names are a 400 now (tests/test_openai_surface.py).
    body = {"prompt": [[5, 6], [7, 8, 9]], "max_tokens": 2, "ignore_eos": True, "echo": False,
            "logit_bias": {"5": 1}, "stop": None, "seed": None}
    async with http.post(tiny.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        out = await resp.json()
    assert len(out["choices"]) == 2 and out["usage"]["prompt_tokens"] == 5
    await wait_until_idle(tiny.engine)


async def test_models_and_health(tiny: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(tiny.url + "/health") as resp:
        assert resp.status == 200
    async with http.get(tiny.url + "/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [tiny.model]
    assert models["data"][0]["max_model_len"] == TINY_MAX_LEN


async def test_metrics_move(tiny: Server, http: aiohttp.ClientSession) -> None:
    before = await metrics(http, tiny)
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True}
    async with http.post(tiny.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
    async with http.post(tiny.url + "/v1/completions", json={"prompt": ""}) as resp:
        assert resp.status == 400
    after = await metrics(http, tiny)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("conveyor:request_success_total", finished_reason="length") == 1
    assert delta("conveyor:prompt_tokens_total") == 3
    assert delta("conveyor:generation_tokens_total") == 4
    assert delta("conveyor:time_to_first_token_seconds_count") == 1
    # vLLM's meanings: inter-token latency (and its old name) one sample per token after the first,
    # the per-request mean under request_time_per_output_token_seconds.
    assert delta("conveyor:inter_token_latency_seconds_count") == 3
    assert delta("conveyor:time_per_output_token_seconds_count") == 3
    assert delta("conveyor:request_time_per_output_token_seconds_count") == 1
    assert delta("conveyor:e2e_request_latency_seconds_count") == 1
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"conveyor:request_{phase}_time_seconds_count") == 1, phase
    assert delta("conveyor:request_prompt_tokens_sum") == 3 and delta("conveyor:request_prompt_tokens_count") == 1
    assert delta("conveyor:request_generation_tokens_sum") == 4
    assert delta("conveyor:request_max_num_generation_tokens_sum") == 4
    assert delta("conveyor:request_params_max_tokens_sum") == 4
    assert delta("conveyor:iteration_tokens_total_sum") == 3 + 3  # one prefill of 3, then 3 decodes
    assert delta("conveyor:http_request_duration_seconds_count", handler="/v1/completions", method="POST",
                 status="200") == 1
    info = [k for k in after if k[0] == "conveyor:cache_config_info"]
    assert len(info) == 1 and dict(info[0][1])["block_size"] == "16" and after[info[0]] == 1
    assert delta("conveyor:e2e_request_latency_seconds_sum") > 0
    assert delta("conveyor:http_responses_total", status="200") >= 2  # the request and the first scrape
    assert delta("conveyor:http_responses_total", status="400") == 1
    for gauge in ("conveyor:num_requests_running", "conveyor:num_requests_waiting", "conveyor:kv_cache_usage_perc"):
        assert (gauge, ()) in after
    assert after[("conveyor:engine_alive", ())] == 1
    await wait_until_idle(tiny.engine)


async def test_a_repeated_prompt_is_served_from_the_prefix_cache(tiny: Server, http: aiohttp.ClientSession) -> None:
    before = await metrics(http, tiny)
    body = {"prompt": list(range(5, 45)), "max_tokens": 3, "ignore_eos": True}  # 40 tokens: 2 whole pages
    usages = []
    for _ in range(2):
        async with http.post(tiny.url + "/v1/completions", json=body) as resp:
            usages.append((await resp.json())["usage"])
    after = await metrics(http, tiny)
    assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": 32}
    hits = after[("conveyor:prefix_cache_hits_total", ())] - before.get(("conveyor:prefix_cache_hits_total", ()), 0)
    queries = after[("conveyor:prefix_cache_queries_total", ())] - before.get(("conveyor:prefix_cache_queries_total", ()), 0)
    assert hits == 32 and queries == 80
    assert after[("conveyor:kv_pages", (("state", "cached"),))] >= 2
    assert after[("conveyor:kv_pages", (("state", "used"),))] == 0
    assert ("conveyor:reservation_beta", ()) in after and ("conveyor:num_retractions_total", ()) in after
    await wait_until_idle(tiny.engine)


async def test_metrics_show_the_sjf_predictors_kendall_tau(tiny_model_dir: Path,
                                                         http: aiohttp.ClientSession) -> None:
    from conveyor.scheduler.length_predictor import kendall_tau

    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_model_dir), max_model_len=TINY_MAX_LEN,
                                                   kv_cache_memory=8 << 20, schedule_policy="sjf"))
    server = await start_server(engine, ServerSettings())
    try:
        before = await metrics(http, server)
        assert before[("conveyor:length_predictor_samples", ())] == 0
        for n in (2, 5, 3, 7):  # one after another, so each finishes (by length) before the next arrives
            async with http.post(server.url + C, json={"prompt": [5, 6, 7], "max_tokens": n, "ignore_eos": True}) as r:
                assert r.status == 200
        await wait_until_idle(engine)
        after = await metrics(http, server)
        pairs = list(engine.core.scheduler.policy.predictor.recent)  # (predicted at arrival, actual)
        assert [actual for _, actual in pairs] == [2, 5, 3, 7]
        assert after[("conveyor:length_predictor_samples", ())] == 4
        tau = after[("conveyor:length_predictor_kendall_tau", ())]
        assert tau == pytest.approx(kendall_tau([p for p, _ in pairs], [a for _, a in pairs])) and tau > 0
    finally:
        await server.runner.cleanup()
        await engine.shutdown()


async def test_one_log_line_per_finished_request(tiny: Server, http: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        async with http.post(tiny.url + "/v1/completions",
                             json={"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True, "n": 2}) as resp:
            out = await resp.json()
    lines = [entry for entry in logs if entry["event"] == "request finished"]
    assert len(lines) == 2
    assert {line["request_id"] for line in lines} == {f"{out['id']}-0", f"{out['id']}-1"}
    for line in lines:
        assert line["prompt_tokens"] == 3 and line["output_tokens"] == 3 and line["finish_reason"] == "length"
        assert 0 <= line["ttft_s"] <= line["e2e_s"]
    await wait_until_idle(tiny.engine)


# -- logprobs and penalties ----------------------------------------------------------------
async def test_completion_logprobs(tiny: Server, http: aiohttp.ClientSession) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "temperature": 0, "logprobs": 2}
    async with http.post(tiny.url + "/v1/completions", json=body) as resp:
        out = await resp.json()
    lp = out["choices"][0]["logprobs"]
    assert lp is not None and len(lp["tokens"]) == len(lp["token_logprobs"]) == 4
    assert all(x <= 0 for x in lp["token_logprobs"]) and all(len(t) == 2 for t in lp["top_logprobs"])
    # Greedy: the sampled token is the most likely one.
    assert all(max(t.values()) == pytest.approx(x) for t, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    await wait_until_idle(tiny.engine)


async def test_chat_logprobs_streaming(tiny: Server, http: aiohttp.ClientSession) -> None:
    body = {"messages": FRANCE, "max_tokens": 4, "ignore_eos": True, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "stream": True}
    entries = []
    async with http.post(tiny.url + "/v1/chat/completions", json=body) as resp:
        async for event in sse_events(resp):
            if event != b"[DONE]":
                choice = json.loads(event)["choices"][0]
                entries += (choice["logprobs"] or {}).get("content") or []
    assert len(entries) == 4
    assert all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 and isinstance(e["bytes"], list) for e in entries)
    await wait_until_idle(tiny.engine)


async def test_penalties_change_greedy_output(tiny: Server, http: aiohttp.ClientSession) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    async with http.post(tiny.url + "/v1/completions", json=body) as resp:
        plain = (await resp.json())["choices"][0]["text"]
    async with http.post(tiny.url + "/v1/completions", json={**body, "repetition_penalty": 5.0,
                                                             "frequency_penalty": 2.0}) as resp:
        penalized = (await resp.json())["choices"][0]["text"]
    assert plain != penalized
    await wait_until_idle(tiny.engine)


# -- malformed requests ---------------------------------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_MSG = [{"role": "user", "content": "hi"}]
TOO_LONG_IDS = [5] * (TINY_MAX_LEN + 10)
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    # (id, path, body (dict = JSON, bytes = raw), status, param)
    ("bad-json", C, b'{"prompt": ', 400, None),
    ("empty-body", C, b"", 400, None),
    ("non-utf8", C, b'{"prompt": "\xff\xfe"}', 400, None),
    ("body-is-array", C, b"[]", 400, None),
    ("prompt-missing", C, {"max_tokens": 2}, 400, "prompt"),
    ("prompt-empty", C, {"prompt": ""}, 400, "prompt"),
    ("prompt-empty-list", C, {"prompt": []}, 400, "prompt"),
    ("prompt-int", C, {"prompt": 123}, 400, "prompt"),
    ("prompt-mixed", C, {"prompt": ["a", 1]}, 400, "prompt"),
    ("prompt-nested-type", C, {"prompt": [[1, "a"]]}, 400, "prompt[0][1]"),
    ("prompt-negative-id", C, {"prompt": [-1]}, 400, "prompt"),
    ("prompt-id-out-of-vocab", C, {"prompt": [10**9]}, 400, "prompt"),
    ("prompt-too-long-ids", C, {"prompt": TOO_LONG_IDS}, 400, "prompt"),
    ("prompt-too-long-text", C, {"prompt": "hello " * 1200}, 400, "prompt"),
    ("prompt-list-second-too-long", C, {"prompt": ["ok", "hello " * 1200]}, 400, "prompt[1]"),
    ("max-tokens-str", C, {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("max-tokens-negative", C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-zero", C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-float", C, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max-tokens-past-context", C, {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("temperature-negative", C, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("temperature-str", C, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top-p-zero", C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", C, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top-k-negative", C, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("min-p-above-one", C, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("n-zero", C, {"prompt": "x", "n": 0}, 400, "n"),
    ("n-negative", C, {"prompt": "x", "n": -1}, 400, "n"),
    ("n-huge", C, {"prompt": "x", "n": 1000}, 400, "n"),
    ("n-str", C, {"prompt": "x", "n": "2"}, 400, "n"),
    ("stop-int", C, {"prompt": "x", "stop": 5}, 400, "stop"),
    ("stop-empty-string", C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("stop-list-of-int", C, {"prompt": "x", "stop": [1]}, 400, "stop[0]"),
    ("stop-token-ids-negative", C, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("presence-penalty-range", C, {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("frequency-penalty-range", C, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("repetition-penalty-zero", C, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("logprobs-too-many", C, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("logprobs-bool", C, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("seed-str", C, {"prompt": "x", "seed": "x"}, 400, "seed"),
    ("stream-str", C, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("stream-options-int", C, {"prompt": "x", "stream": True, "stream_options": 3}, 400, "stream_options"),
    ("ignore-eos-str", C, {"prompt": "x", "ignore_eos": "no"}, 400, "ignore_eos"),
    ("priority-str", C, {"prompt": "x", "priority": "high"}, 400, "priority"),
    ("user-int", C, {"prompt": "x", "user": 5}, 400, "user"),
    ("model-unknown", C, {"prompt": "x", "model": "nope"}, 404, "model"),
    ("model-int", C, {"prompt": "x", "model": 5}, 400, "model"),
    ("messages-missing", CHAT, {"max_tokens": 2}, 400, "messages"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("messages-str", CHAT, {"messages": "hi"}, 400, "messages"),
    ("messages-item-int", CHAT, {"messages": [5]}, 400, "messages[0]"),
    ("message-no-role", CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("message-unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("message-content-int", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("message-image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0]"),
    ("messages-too-long", CHAT, {"messages": [{"role": "user", "content": "hello " * 1200}]}, 400, "messages"),
    ("top-logprobs-without-logprobs", CHAT, {"messages": OK_MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top-logprobs-too-many", CHAT, {"messages": OK_MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("max-completion-tokens-negative", CHAT, {"messages": OK_MSG, "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("chat-model-unknown", CHAT, {"messages": OK_MSG, "model": "gpt-4o"}, 404, "model"),
    ("chat-n-zero", CHAT, {"messages": OK_MSG, "n": 0}, 400, "n"),
    ("body-10MB", C, b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS])
async def test_malformed_request(tiny: Server, http: aiohttp.ClientSession, path: str, body: Any, status: int,
                                 param: str | None) -> None:
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.post(tiny.url + path, **kwargs) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert param.split("[")[0].split(".")[0] in err["message"] or param in err["message"]
    await assert_still_serves(tiny, http)


async def assert_still_serves(server: Server, http: aiohttp.ClientSession) -> None:
    async with http.post(server.url + C, json={"prompt": [5, 6], "max_tokens": 2, "ignore_eos": True}) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 2
    await wait_until_idle(server.engine)


async def test_chunked_body_over_limit(tiny: Server, http: aiohttp.ClientSession) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: aiohttp must cut it off itself
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * (64 << 10)
        yield b'"}'

    async with http.post(tiny.url + C, data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"
    await assert_still_serves(tiny, http)


async def test_wrong_method_and_route(tiny: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(tiny.url + C) as resp:
        assert resp.status == 405 and "error" in await resp.json()
    async with http.post(tiny.url + "/v1/nothing", json={}) as resp:
        assert resp.status == 404 and "error" in await resp.json()


async def test_engine_failure_is_a_500_and_an_error_event(tiny: Server, http: aiohttp.ClientSession,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    core = tiny.engine.core
    real_step = core.step
    failures = [1, 1]

    def failing_step() -> Any:  # one real step (the request is running), then the "bug"
        outputs = real_step()
        if failures and core.scheduler.running:
            failures.pop()
            raise RuntimeError("injected step failure")
        return outputs

    monkeypatch.setattr(core, "step", failing_step)
    body = {"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": True}
    async with http.post(tiny.url + C, json=body) as resp:
        assert resp.status == 500
        err = (await resp.json())["error"]
    assert err["code"] == "engine_error" and "injected step failure" in err["message"]
    async with http.post(tiny.url + C, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        events = [e async for e in sse_events(resp)]
    assert events[-1] == b"[DONE]"
    assert "injected step failure" in json.loads(events[-3])["error"]["message"]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "error"
    monkeypatch.undo()
    await assert_still_serves(tiny, http)


# -- disconnects ----------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny_no_cancel(tiny_engine: AsyncEngine) -> AsyncIterator[Server]:
    """aiohttp's default: handlers are not cancelled on disconnect; only a failed write tells."""
    server = await start_server(tiny_engine, ServerSettings(), handler_cancellation=False)
    yield server
    await server.runner.cleanup()


LONG = {"prompt": [5, 6, 7], "max_tokens": TINY_MAX_LEN - 10, "ignore_eos": True, "stream": True}


@contextlib.contextmanager
def count_steps(engine: AsyncEngine) -> Iterator[list[Any]]:
    """The engine steps taken inside the block (the engine's per-step records, on for the block)."""
    engine.core.step_records = []
    try:
        yield engine.core.step_records
    finally:
        engine.core.step_records = None


def assert_freed_early(steps: list[Any]) -> None:
    # The request had ~1000 tokens to go: freeing its pages must take a handful of steps (the
    # server noticing the disconnect, then one command drain), not the rest of its run.
    assert len(steps) < LONG["max_tokens"] // 4, f"{len(steps)} engine steps before the pages came back"


@pytest.mark.parametrize("cancellation", [True, False], ids=["handler-cancellation", "write-error"])
async def test_disconnect_mid_stream_frees_pages(tiny: Server, tiny_no_cancel: Server, http: aiohttp.ClientSession,
                                                 cancellation: bool) -> None:
    server = tiny if cancellation else tiny_no_cancel
    sched = server.engine.core.scheduler
    before = await metrics(http, server)
    resp = await http.post(server.url + C, json=LONG)
    seen = 0
    async for event in sse_events(resp):
        seen += 1
        if seen == 3:
            break
    assert len(sched.requests) == 1 and sched.kv.num_available_pages < sched.kv.total_pages
    with capture_logs() as logs, count_steps(server.engine) as steps:
        resp.close()  # drops the connection mid-stream
        await wait_until_idle(server.engine)
        await wait_for(lambda: any(e["event"] == "client disconnected mid-stream" for e in logs),
                       what="the handler to notice the disconnect")
    assert_freed_early(steps)
    finished = [e for e in logs if e["event"] == "request finished"]
    assert len(finished) == 1 and finished[0]["finish_reason"] == "abort" and finished[0]["output_tokens"] >= 2
    after = await metrics(http, server)
    key = ("conveyor:request_success_total", (("finished_reason", "abort"),))
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert not server.app[STATE].inflight.ids
    await assert_still_serves(server, http)


async def test_disconnect_while_not_streaming_frees_pages(tiny: Server, http: aiohttp.ClientSession) -> None:
    sched = tiny.engine.core.scheduler
    post = asyncio.create_task(http.post(tiny.url + C, json={**LONG, "stream": False}))
    await wait_for(lambda: len(sched.requests) == 1, what="the request to reach the engine")
    with count_steps(tiny.engine) as steps:
        post.cancel()  # the client gives up: aiohttp closes the connection
        with pytest.raises(asyncio.CancelledError):
            await post
        await wait_until_idle(tiny.engine)
    assert_freed_early(steps)
    await assert_still_serves(tiny, http)


# -- backpressure ---------------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="module")
async def one_seq(tiny_model_dir: Path) -> AsyncIterator[Server]:
    """One sequence at a time and a queue bound of 2, so queueing is easy to force."""
    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_model_dir), max_model_len=4096,
                                                   kv_cache_memory=8 << 20, max_num_seqs=1))
    server = await start_server(engine, ServerSettings(max_waiting_requests=2))
    yield server
    await server.runner.cleanup()
    await engine.shutdown()


async def test_backpressure_429(one_seq: Server, http: aiohttp.ClientSession) -> None:
    # A long request holds the only sequence slot; everything after it has to wait.
    blocker = await http.post(one_seq.url + C, json={**LONG, "max_tokens": 600})
    assert blocker.status == 200
    blocker_events = sse_events(blocker)
    await anext(blocker_events)

    body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    burst = await asyncio.gather(*(http.post(one_seq.url + C, json=body) for _ in range(8)))
    admitted = [r for r in burst if r.status == 200]
    rejected = [r for r in burst if r.status != 200]
    assert len(admitted) == 2 and len(rejected) == 6  # none lost: every request got an answer
    for r in rejected:
        assert r.status == 429 and r.headers["Retry-After"] == "1"
        assert (await r.json())["error"]["code"] == "queue_full"
    rest = await asyncio.wait_for(collect(blocker_events), 60)
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"  # it held the slot to the end
    for r in admitted:  # ... and then the admitted requests all complete
        events = await asyncio.wait_for(collect(sse_events(r)), 20)
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 3
    await wait_until_idle(one_seq.engine)
    await assert_still_serves(one_seq, http)


async def test_disconnect_hands_the_slot_to_a_waiting_request(one_seq: Server, http: aiohttp.ClientSession) -> None:
    """A client leaving while others wait for its sequence slot: the next one must get the slot."""
    blocker = await http.post(one_seq.url + C, json={**LONG, "max_tokens": 2000})
    await anext(sse_events(blocker))
    waiting = asyncio.create_task(http.post(one_seq.url + C, json={"prompt": [5, 6, 7], "max_tokens": 3,
                                                                   "ignore_eos": True}))
    await wait_for(lambda: one_seq.engine.stats().num_waiting == 1, what="the second request to queue")
    blocker.close()
    resp = await asyncio.wait_for(waiting, 10)
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 3
    await wait_until_idle(one_seq.engine)


class _EngineKilled(BaseException):
    """Not an Exception: the engine loop's per-step guard does not catch it, so the thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_engine_death_fails_requests_instead_of_hanging(tiny_model_dir: Path,
                                                             http: aiohttp.ClientSession) -> None:
    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_model_dir), max_model_len=TINY_MAX_LEN,
                                                   kv_cache_memory=8 << 20))
    server = await start_server(engine, ServerSettings())
    try:
        streaming = await http.post(server.url + C, json=LONG)
        events = sse_events(streaming)
        await anext(events)
        plain = asyncio.create_task(http.post(server.url + C, json={**LONG, "stream": False}))
        await wait_for(lambda: len(engine.core.scheduler.requests) == 2, what="both requests in the engine")

        def die() -> None:
            raise _EngineKilled()

        engine.core.step = die  # type: ignore[method-assign]
        rest = [e async for e in events]
        assert rest[-1] == b"[DONE]" and json.loads(rest[-2])["error"]["code"] == "engine_dead"
        resp = await plain
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "engine_dead"
        async with http.get(server.url + "/health") as resp:
            assert resp.status == 503
        async with http.post(server.url + C, json={"prompt": [5], "max_tokens": 1}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert not server.app[STATE].inflight.ids
    finally:
        await server.runner.cleanup()
        await engine.shutdown()


# -- graceful shutdown ----------------------------------------------------------------------
async def test_sigterm_graceful_shutdown(tiny_model_dir: Path, http: aiohttp.ClientSession) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor", "serve", "--model", str(tiny_model_dir), "--port", str(port),
        "--max-model-len", "2048", "--kv-cache-memory", "8MiB", "--shutdown-timeout", "0.5",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:  # bounded poll until the server answers /health
            assert proc.returncode is None, (await proc.stderr.read()).decode()
            assert loop.time() < deadline, "server did not come up"
            try:
                async with http.get(url + "/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)

        # A request that cannot finish within the shutdown timeout: it must end as "abort".
        resp = await http.post(url + C, json={**LONG, "max_tokens": 2000})
        events = sse_events(resp)
        await anext(events)
        proc.send_signal(signal.SIGTERM)
        rest = [e async for e in events]
        assert rest[-1] == b"[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "abort"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(url + "/health"):
            pass
