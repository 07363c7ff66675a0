"""API fuzzing from ``/openapi.json``: every endpoint, generated valid and invalid bodies.

Hypothesis draws request bodies from the server's own published schemas (hypothesis-jsonschema)
and breaks them (a field swapped for arbitrary JSON, bodies that are not objects, bytes that are
not JSON). Whatever comes in: no 5xx, every 4xx in OpenAI's error shape, every stream ends with
``[DONE]`` and no server error, and afterwards the engine is alive, idle, with every KV page free
and its integrity check passing. Derandomized and bounded (a fixed example count per route) so CI
sees the same few hundred requests every run, in well under a minute on two cores.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from test_server import Server, start_server, wait_until_idle

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import ServerSettings
from conveyor.runtime.server.protocol import ErrorResponse

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = 40  # per route and kind (valid / invalid)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4), max_leaves=12)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_chat_dir: Path) -> AsyncIterator[Server]:
    engine = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=256,
                                                   kv_cache_memory=4 << 20, max_num_seqs=8))
    srv = await start_server(engine, ServerSettings(max_request_body=64 << 10, stats_interval_s=0))
    yield srv
    await srv.runner.cleanup()
    await engine.shutdown()


def bounded(body: Any) -> Any:
    """Keep valid bodies cheap: few tokens, few choices (the schema allows a context's worth)."""
    if isinstance(body, dict):
        for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2), ("top_logprobs", 3),
                         ("logprobs", 3)):
            if type(body.get(key)) is int and body[key] > cap:
                body[key] = cap
    return body


# Fields that any value of their schema type may hold (or the server must refuse cleanly): a
# "meaningful" body keeps only these from a schema-valid one, then gets a real prompt, so a good
# share of the fuzzing reaches the engine instead of stopping at validation.
_KEEP = {"stream", "stream_options", "seed", "stop", "n", "max_tokens", "max_completion_tokens", "ignore_eos",
         "skip_special_tokens", "include_stop_str_in_output", "user", "logprobs", "top_logprobs",
         "return_token_strs", "add_special_tokens", "add_generation_prompt"}
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=16)
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": _TEXT}), min_size=1, max_size=3)
_CORE = {"/v1/completions": st.fixed_dictionaries({"prompt": _TEXT | _IDS}),
         "/v1/chat/completions": st.fixed_dictionaries({"messages": _MESSAGES}),
         "/tokenize": st.fixed_dictionaries({"prompt": _TEXT}) | st.fixed_dictionaries({"messages": _MESSAGES}),
         "/detokenize": st.fixed_dictionaries({"tokens": _IDS})}


def meaningful(path: str, valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    core = _CORE.get(path)
    if core is None:
        return valid
    return st.tuples(valid, core).map(
        lambda pair: bounded({**{k: v for k, v in pair[0].items() if k in _KEEP}, **pair[1]}))


class Client:
    """Plain blocking HTTP from the fuzzing thread, while the server runs on the test's event loop."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.seen: dict[int, int] = {}

    def send(self, method: str, path: str, raw: bytes | None = None) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            headers = {"Content-Type": "application/json"} if raw is not None else {}
            conn.request(method, path, body=raw, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            self.seen[resp.status] = self.seen.get(resp.status, 0) + 1
            return resp.status, body, resp.getheader("Content-Type", "")
        finally:
            conn.close()

    def check(self, method: str, path: str, raw: bytes | None = None) -> int:
        status, body, ctype = self.send(method, path, raw)
        what = f"{method} {path} {raw[:300] if raw else b''!r} -> {status} {body[:300]!r}"
        assert status < 500, what
        if status >= 400:
            err = msgspec.json.decode(body, type=ErrorResponse).error  # OpenAI's shape, or this raises
            assert err.message and err.type, what
        elif ctype.startswith("text/event-stream"):
            events = [e for e in body.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]", what
            for e in events[:-1]:
                payload = json.loads(e.removeprefix(b"data: "))
                assert "error" not in payload or payload["error"]["type"] != "server_error", what
        elif ctype.startswith("application/json"):
            json.loads(body)
        return status


def fuzz_routes(client: Client, spec: dict[str, Any]) -> None:
    components = spec["components"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                if "{model_id}" in path:
                    @FUZZ
                    @given(st.text(min_size=1, max_size=40))
                    def model_ids(model_id: str) -> None:
                        client.check("GET", path.replace("{model_id}", quote(model_id, safe="")))
                    model_ids()
                else:
                    assert client.check(method.upper(), path) == 200, path
                continue
            schema = {**op["requestBody"]["content"]["application/json"]["schema"], "components": components}
            valid = from_schema(schema).map(bounded)

            @FUZZ
            @given(valid | meaningful(path, valid))
            def valid_bodies(body: Any) -> None:
                client.check("POST", path, json.dumps(body).encode())

            @FUZZ
            @given(st.one_of(
                valid.flatmap(lambda b: st.sampled_from(sorted(b) or ["x"]).flatmap(
                    lambda key: JSON.map(lambda v: {**b, key: v}))),  # one field of a valid body broken
                JSON,  # anything at all, objects or not
                st.binary(max_size=64),  # not JSON, or not UTF-8
            ))
            def invalid_bodies(body: Any) -> None:
                raw = body if isinstance(body, bytes) else json.dumps(bounded(body)).encode()
                client.check("POST", path, raw)

            valid_bodies()
            invalid_bodies()


async def test_fuzz_every_endpoint_from_openapi(server: Server) -> None:
    client = Client(server.url)
    status, raw, _ = await asyncio.to_thread(client.send, "GET", "/openapi.json")
    spec = json.loads(raw)
    posts = [p for p, ops in spec["paths"].items() if "post" in ops]
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= set(posts)
    await asyncio.to_thread(fuzz_routes, client, spec)
    assert client.seen.get(200, 0) > 0 and client.seen.get(400, 0) > 0, client.seen  # both kinds really ran
    print("statuses seen:", dict(sorted(client.seen.items())), "requests:", sum(client.seen.values()))
    assert all(s < 500 for s in client.seen)
    assert server.engine.is_alive
    await wait_until_idle(server.engine)  # no request left behind, every KV page free, integrity holds
    status, _, _ = await asyncio.to_thread(client.send, "GET", "/health")
    assert status == 200
