"""The OpenAI surface without silent lies: every field honoured or refused with a 400.

Structured outputs through the official client (``parse`` with pydantic models, streaming and
not), regex/choice/json_object, logit_bias, min_tokens, echo, truncation, continuous usage, chat
template options and tool calls, on the default model; the same requests at pipeline depth 1 and 2
give the same tokens. Refusals and unknown fields run on the tiny random model.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from enum import Enum
from typing import Any

import aiohttp
import jsonschema
import msgspec
import openai
import pytest
import pytest_asyncio
from pydantic import BaseModel, Field
from structlog.testing import capture_logs

from conveyor.runtime.async_engine import AsyncEngine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.server.app import ServerSettings
from conveyor.runtime.server.inputs import chat_plan
from conveyor.runtime.server.protocol import ChatCompletionRequest
from conveyor.runtime.server.tools import ToolSetup, parse_output
from tests.test_server import (  # noqa: F401  (fixtures)
    Server,
    assert_still_serves,
    http,
    sse_events,
    start_server,
    tiny,
    tiny_engine,
    tiny_model_dir,
    wait_until_idle,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

C, CHAT = "/v1/completions", "/v1/chat/completions"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smols() -> AsyncIterator[dict[int, Server]]:
    """The default model at pipeline depth 1 (no overlap) and 2 (overlap)."""
    servers = {}
    for depth in (1, 2):
        engine = await AsyncEngine.create(EngineConfig(model="default", max_model_len=1024,
                                                       kv_cache_memory=64 << 20, pipeline_depth=depth))
        servers[depth] = await start_server(engine, ServerSettings())
    yield servers
    for server in servers.values():
        await server.runner.cleanup()
        await server.engine.shutdown()


def client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# -- structured outputs ---------------------------------------------------------------------
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)


class Answer(BaseModel):  # nested, enum, bounded array
    city: City
    color: Color
    tags: list[Color] = Field(max_length=3)


class Person(BaseModel):  # required scalars of every kind
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    likes_tea: bool
    height_m: float = Field(ge=0, le=3)


class Verdict(BaseModel):
    verdict: Color


SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (Answer, "Name a city and a color as JSON."),
    (Person, "Describe a person as JSON."),
    (Verdict, "Pick a color."),
]


@pytest.mark.parametrize("stream", [False, True])
async def test_parse_returns_validated_objects(smols: dict[int, Server], stream: bool) -> None:
    smol = smols[2]
    c = client(smol)
    for model, prompt in SCHEMAS:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            async with c.chat.completions.stream(model=smol.model, messages=messages, response_format=model,
                                                 temperature=0, max_tokens=120) as s:
                done = await s.get_final_completion()
        else:
            done = await c.chat.completions.parse(model=smol.model, messages=messages, response_format=model,
                                                  temperature=0, max_tokens=120)
        msg = done.choices[0].message
        assert isinstance(msg.parsed, model), msg.content
        assert model.model_validate_json(msg.content) == msg.parsed
        assert done.choices[0].finish_reason == "stop"
    await wait_until_idle(smol.engine)


async def test_json_object_regex_and_choice(smols: dict[int, Server]) -> None:
    smol = smols[2]
    c = client(smol)
    out = await c.chat.completions.create(model=smol.model, messages=[{"role": "user", "content": "Give me JSON."}],
                                          response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a valid JSON prefix, starting an object
        assert out.choices[0].message.content.startswith("{")
    phone = r"\+33 [1-9]( [0-9]{2}){4}"
    for extra in ({"structured_outputs": {"regex": phone}}, {"guided_regex": phone}):
        out = await c.chat.completions.create(model=smol.model, messages=[{"role": "user", "content": "A phone number?"}],
                                              temperature=0, max_tokens=40, extra_body=extra)
        assert re.fullmatch(phone, out.choices[0].message.content), out.choices[0].message.content
    choices = ["Paris", "Lyon", "Marseille"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        out = await c.chat.completions.create(model=smol.model, messages=FRANCE, temperature=0.8, seed=1,
                                              max_tokens=10, extra_body=extra)
        assert out.choices[0].message.content in choices
    # n choices: each has its own matcher.
    out = await c.chat.completions.create(model=smol.model, messages=FRANCE, temperature=1.0, seed=5, n=3,
                                          max_tokens=10, extra_body={"guided_choice": choices})
    assert len(out.choices) == 3 and all(ch.message.content in choices for ch in out.choices)
    # Completions take the same fields.
    out = await c.completions.create(model=smol.model, prompt="The best city is", max_tokens=10,
                                     extra_body={"guided_choice": choices})
    assert out.choices[0].text in choices
    await wait_until_idle(smol.engine)


# -- sampling fields, at depths 1 and 2 -----------------------------------------------------
def _token(engine: AsyncEngine, text: str) -> int:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


async def _post(http: aiohttp.ClientSession, server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(server.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_sampling_fields_do_what_they_say_at_depths_1_and_2(smols: dict[int, Server],
                                                                  http: aiohttp.ClientSession) -> None:
    engine = smols[2].engine
    paris, banana = _token(engine, " Paris"), _token(engine, " banana")
    lp = {"logprobs": True, "top_logprobs": 0}
    base = {"messages": FRANCE, "temperature": 0, "max_tokens": 20, **lp}
    bodies = {
        "plain": base,
        "ban": {**base, "logit_bias": {str(paris): -100}},
        "force": {**base, "logit_bias": {str(banana): 100}, "max_tokens": 4},
        "min": {**base, "max_tokens": 40, "min_tokens": 30},
        "seeded": {**base, "temperature": 1.0, "seed": 7},
        "schema": {**base, "max_tokens": 120, "response_format": {"type": "json_schema", "json_schema": {
            "name": "a", "schema": Answer.model_json_schema(), "strict": True}}},
        "choice": {**base, "temperature": 1.0, "seed": 3, "guided_choice": ["Paris", "Lyon", "Nice"]},
    }
    results: dict[int, dict[str, Any]] = {}
    for depth, server in smols.items():
        results[depth] = {k: await _post(http, server, CHAT, b) for k, b in bodies.items()}
        await wait_until_idle(server.engine)

    def tokens(out: dict[str, Any]) -> list[str]:
        return [e["token"] for e in out["choices"][0]["logprobs"]["content"]]

    for name in bodies:
        assert tokens(results[1][name]) == tokens(results[2][name]), name
    r = results[2]
    assert " Paris" in tokens(r["plain"]), "the unbiased answer names Paris (else the ban proves nothing)"
    assert " Paris" not in tokens(r["ban"])
    assert tokens(r["force"]) == [" banana"] * 4
    plain_len = r["plain"]["usage"]["completion_tokens"]
    assert r["plain"]["choices"][0]["finish_reason"] == "stop" and plain_len < 30
    assert r["min"]["usage"]["completion_tokens"] >= 30
    Answer.model_validate_json(r["schema"]["choices"][0]["message"]["content"])
    assert r["choice"]["choices"][0]["message"]["content"] in ("Paris", "Lyon", "Nice")


async def test_echo_truncation_and_continuous_usage(smols: dict[int, Server], http: aiohttp.ClientSession) -> None:
    smol = smols[2]
    out = await _post(http, smol, C, {"prompt": "The capital of France is", "max_tokens": 3, "echo": True,
                                      "temperature": 0})
    plain = await _post(http, smol, C, {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert out["choices"][0]["text"] == "The capital of France is" + plain["choices"][0]["text"]
    ids = [5, 6, 7, 8, 9, 10, 11]
    out = await _post(http, smol, C, {"prompt": ids, "max_tokens": 3, "truncate_prompt_tokens": 3, "temperature": 0,
                                      "echo": True})
    assert out["usage"]["prompt_tokens"] == 3
    assert out["choices"][0]["text"].startswith(smol.engine.tokenizer.decode(ids[-3:]))
    body = {"messages": FRANCE, "max_tokens": 5, "stream": True, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with http.post(smol.url + CHAT, json=body) as resp:
        events = [e async for e in sse_events(resp)]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == b"[DONE]"
    content = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")]
    assert content and all(ch["usage"] is not None for ch in content)
    counts = [ch["usage"]["completion_tokens"] for ch in content]
    assert counts == sorted(counts) and chunks[-1]["usage"]["completion_tokens"] == 5
    await wait_until_idle(smol.engine)


async def test_prompt_logprobs_and_echo_logprobs(tiny: Server, http: aiohttp.ClientSession) -> None:
    ids = [(j * 131) % 40000 + 5 for j in range(40)]
    out = await _post(http, tiny, C, {"prompt": ids, "max_tokens": 2, "prompt_logprobs": 2, "temperature": 0,
                                      "ignore_eos": True})
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert str(ids[pos]) in entry and 2 <= len(entry) <= 3
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(ids[pos]))
        assert ranks == [1, 2] and entry[str(ids[pos])]["logprob"] <= 0
    # The same numbers through echo + logprobs (OpenAI's legacy shape), streamed too.
    body = {"prompt": ids, "max_tokens": 2, "logprobs": 2, "echo": True, "temperature": 0, "ignore_eos": True}
    echo = (await _post(http, tiny, C, body))["choices"][0]
    assert echo["prompt_logprobs"] is None  # not asked for by name
    lp = echo["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == [plp[p][str(ids[p])]["logprob"] for p in range(1, len(ids))]
    async with http.post(tiny.url + C, json={**body, "stream": True}) as resp:
        chunks = [json.loads(e) for e in [e async for e in sse_events(resp)][:-1]]
    streamed = [t for ch in chunks for c in ch["choices"] if c.get("logprobs") for t in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    out = await _post(http, tiny, CHAT, {"messages": OK, "max_tokens": 1, "prompt_logprobs": 0})
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == out["usage"]["prompt_tokens"] and all(len(e) == 1 for e in plp[1:])
    await wait_until_idle(tiny.engine)


# -- chat template options ------------------------------------------------------------------
THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% if enable_thinking %}<think>{% else %}<think></think>{% endif %}{% endif %}")


def _prompt(engine: AsyncEngine, body: dict[str, Any], settings: ServerSettings | None = None) -> str:
    plan = chat_plan(engine, msgspec.convert(body, ChatCompletionRequest), settings)
    return engine.tokenizer.decode(plan.requests[0].prompt_token_ids)


async def test_chat_template_options(smols: dict[int, Server], http: aiohttp.ClientSession) -> None:
    engine = smols[2].engine
    hi = [{"role": "user", "content": "hi"}]
    on = _prompt(engine, {"messages": hi, "chat_template": THINK_TEMPLATE, "chat_template_kwargs": {"enable_thinking": True}})
    off = _prompt(engine, {"messages": hi, "chat_template": THINK_TEMPLATE,
                           "chat_template_kwargs": {"enable_thinking": False}})
    assert on.endswith("assistant\n<think>") and off.endswith("<think></think>")
    # --chat-template: the server's template replaces the model's when a request names none.
    served = _prompt(engine, {"messages": hi}, ServerSettings(chat_template=THINK_TEMPLATE))
    assert served.endswith("<think></think>") and "SmolLM" not in served
    assert _prompt(engine, {"messages": hi}).endswith("<|im_start|>assistant\n")
    assert not _prompt(engine, {"messages": hi, "add_generation_prompt": False}).endswith("assistant\n")
    partial = hi + [{"role": "assistant", "content": "The answer is"}]
    cont = _prompt(engine, {"messages": partial, "continue_final_message": True})
    assert cont.endswith("The answer is")
    out = await _post(http, smols[2], CHAT, {"messages": partial, "continue_final_message": True, "max_tokens": 3,
                                             "temperature": 0})
    assert out["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(cont, add_special_tokens=False))
    await wait_until_idle(engine)


# -- tools ----------------------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city", "parameters": TIME}},
]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


async def _calls(c: openai.AsyncOpenAI, model: str, stream: bool, **kw: Any) -> tuple[list[tuple[str, str]], str, Any]:
    """(name, arguments) per call, the finish reason and the content, streamed deltas reassembled."""
    if not stream:
        out = await c.chat.completions.create(model=model, stream=False, **kw)
        msg = out.choices[0].message
        return [(t.function.name, t.function.arguments) for t in msg.tool_calls or []], out.choices[0].finish_reason, \
            msg.content
    calls: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    finish, content = None, ""
    async for chunk in await c.chat.completions.create(model=model, stream=True, **kw):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", ""])
                if tc.id:
                    ids[tc.index] = tc.id
                entry[0] += tc.function.name or ""
                entry[1] += tc.function.arguments or ""
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert set(ids) == set(calls), "every streamed call has an id"
    return [(n, a) for _, (n, a) in sorted(calls.items())], finish, content or None


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_required_and_named(smols: dict[int, Server], stream: bool) -> None:
    smol = smols[2]
    c = client(smol)
    base = dict(messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
    calls, finish, _ = await _calls(c, smol.model, stream, tool_choice="required", parallel_tool_calls=False, **base)
    assert len(calls) == 1 and finish == "tool_calls"
    name, args = calls[0]
    jsonschema.validate(json.loads(args), SCHEMA_OF[name])
    if not stream:  # streamed deltas must reassemble to the same call
        assert (calls, finish) == (await _calls(c, smol.model, True, tool_choice="required",
                                                parallel_tool_calls=False, **base))[:2]
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, finish, content = await _calls(c, smol.model, stream, tool_choice=named, **base)
    assert [n for n, _ in calls] == ["get_time"] and content is None
    jsonschema.validate(json.loads(calls[0][1]), TIME)
    await wait_until_idle(smol.engine)


FORCED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_auto_parses_hermes_calls(smols: dict[int, Server], stream: bool) -> None:
    smol = smols[2]
    c = client(smol)
    # The 135M model answers this in prose (it does not call tools unprompted): content, no calls.
    calls, finish, content = await _calls(c, smol.model, stream, messages=ASK, tools=TOOLS, tool_choice="auto",
                                          temperature=0, max_tokens=30)
    assert calls == [] and content and finish in ("stop", "length")
    # Force the output into the Hermes format (regex) to check that auto mode parses it, streamed or not.
    calls, finish, content = await _calls(c, smol.model, stream, messages=ASK, tools=TOOLS, tool_choice="auto",
                                          temperature=0, max_tokens=60, extra_body={"guided_regex": re.escape(FORCED_CALL)})
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}')] and finish == "tool_calls"
    assert content is None
    await wait_until_idle(smol.engine)


async def test_auto_with_a_strict_tool_holds_calls_to_the_schema(smols: dict[int, Server],
                                                                 http: aiohttp.ClientSession) -> None:
    engine = smols[2].engine
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    body = {"messages": ASK, "tools": strict, "tool_choice": "auto", "parallel_tool_calls": False}
    plan = chat_plan(engine, msgspec.convert(body, ChatCompletionRequest))
    matcher = plan.requests[0].grammar
    assert matcher is not None, "a strict tool under auto must constrain the output"
    tok = engine.tokenizer

    def accepts(text: str) -> bool:
        m = engine.core.inputs.grammars.matcher(plan.requests[0].params.structured)
        return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False))

    assert accepts("Let me check. " + FORCED_CALL)
    assert not accepts('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}')
    assert not accepts('<tool_call>\n{"name": "rm_rf", "arguments": {}}')
    out = await _post(http, smols[2], CHAT, {**body, "max_tokens": 30, "temperature": 0})
    assert out["choices"][0]["message"]["content"]  # this model answers in prose: allowed
    await wait_until_idle(engine)


async def test_hermes_parser() -> None:
    setup = ToolSetup(TOOLS, "auto", None, True)
    content, calls = parse_output(setup, "Sure." + FORCED_CALL + '<tool_call>[{"name": "get_time", "arguments": '
                                  '{"city": "Rome"}}]</tool_call>')
    assert content == "Sure." and [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"city": "Rome"})]
    assert parse_output(setup, "no tools here") == ("no tools here", [])
    broken = '<tool_call>{"name": "get_weather", "argu'
    assert parse_output(setup, broken) == (broken, [])
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_output(setup, unknown)[1] == []
    single = ToolSetup(TOOLS, "auto", None, False)  # parallel_tool_calls false: the first call only
    assert [t.function.name for t in parse_output(single, FORCED_CALL + FORCED_CALL)[1]] == ["get_weather"]


async def test_tool_history_is_rendered(smols: dict[int, Server], http: aiohttp.ClientSession) -> None:
    engine = smols[2].engine
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    prompt = _prompt(engine, {"messages": history, "tools": TOOLS})
    assert '"name": "get_weather"' in prompt and '"city": "Paris"' in prompt  # the call, in the history
    assert '<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response>' in prompt
    assert "<tools>" in prompt and "get_time" in prompt  # the tool list, in the system prompt
    out = await _post(http, smols[2], CHAT, {"messages": history, "tools": TOOLS, "max_tokens": 20, "temperature": 0})
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt, add_special_tokens=False))
    await wait_until_idle(engine)


# -- refused and unknown fields -------------------------------------------------------------
OK = [{"role": "user", "content": "hi"}]
REFUSED: list[tuple[str, str, dict[str, Any], str]] = [
    ("unknown-top", C, {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("unknown-chat", CHAT, {"messages": OK, "store": True}, "store"),
    ("unknown-nested", CHAT, {"messages": [{"role": "user", "content": "x", "foo": 1}]}, "messages[0].foo"),
    ("unknown-stream-options", C, {"prompt": "x", "stream": True, "stream_options": {"bar": 1}}, "stream_options.bar"),
    ("unknown-function-call", CHAT, {"messages": OK, "functions": [{"name": "f"}]}, "functions"),
    ("best-of", C, {"prompt": "x", "best_of": 2}, "best_of"),
    ("suffix", C, {"prompt": "x", "suffix": "end"}, "suffix"),
    ("prompt-logprobs-range", C, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("whitespace-pattern", C, {"prompt": "x", "guided_json": {}, "guided_whitespace_pattern": " "},
     "guided_whitespace_pattern"),
    ("backend-outlines", C, {"prompt": "x", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ("format-type", CHAT, {"messages": OK, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("format-no-schema", CHAT, {"messages": OK, "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
     "response_format.json_schema.schema"),
    ("format-bad-schema", CHAT, {"messages": OK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "nope"}}}}, "response_format.json_schema.schema"),
    ("bad-regex", C, {"prompt": "x", "structured_outputs": {"regex": "([a"}}, "structured_outputs.regex"),
    ("bad-grammar", C, {"prompt": "x", "guided_grammar": "root ::= foo"}, "guided_grammar"),
    ("guided-json-not-json", C, {"prompt": "x", "guided_json": "{nope"}, "guided_json"),
    ("empty-choice", C, {"prompt": "x", "guided_choice": []}, "guided_choice"),
    ("two-constraints", C, {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("logit-bias-range", C, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("logit-bias-key", C, {"prompt": "x", "logit_bias": {"Paris": 1}}, "logit_bias"),
    ("logit-bias-vocab", C, {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    ("min-tokens-negative", C, {"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ("min-tokens-over-max", C, {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ("min-tokens-with-grammar", C, {"prompt": "x", "min_tokens": 2, "guided_choice": ["a"]}, "min_tokens"),
    ("truncate-zero", C, {"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("stream-options-without-stream", C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("tool-choice-without-tools", CHAT, {"messages": OK, "tool_choice": "required"}, "tool_choice"),
    ("tool-choice-unknown-name", CHAT, {"messages": OK, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("tool-choice-word", CHAT, {"messages": OK, "tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tool-type", CHAT, {"messages": OK, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ("tools-and-format", CHAT, {"messages": OK, "tools": TOOLS, "tool_choice": "required",
                                "response_format": {"type": "json_object"}}, "response_format"),
    ("continue-not-assistant", CHAT, {"messages": OK, "continue_final_message": True}, "continue_final_message"),
    ("continue-and-generation-prompt", CHAT, {"messages": OK, "continue_final_message": True,
                                              "add_generation_prompt": True}, "continue_final_message"),
    ("template-kwargs-clash", CHAT, {"messages": OK, "chat_template_kwargs": {"add_generation_prompt": False,
                                                                              "continue_final_message": True}},
     "chat_template_kwargs"),
]


@pytest.mark.parametrize(("path", "body", "param"), [pytest.param(*case[1:], id=case[0]) for case in REFUSED])
async def test_refused_fields_are_a_400_naming_them(tiny: Server, http: aiohttp.ClientSession, path: str,
                                                    body: dict[str, Any], param: str) -> None:
    async with http.post(tiny.url + path, json=body) as resp:
        assert resp.status == 400, await resp.text()
        err = (await resp.json())["error"]
    assert err["param"] == param, err
    assert param.split("[")[0].split(".")[0] in err["message"], err
    assert "Traceback" not in err["message"] and "/project/" not in err["message"]
    await assert_still_serves(tiny, http)


async def test_ignore_unknown_fields_accepts_and_logs(tiny_engine: AsyncEngine, http: aiohttp.ClientSession) -> None:
    server = await start_server(tiny_engine, ServerSettings(ignore_unknown_fields=True))
    try:
        with capture_logs() as logs:
            out = await _post(http, server, C, {"prompt": [5, 6], "max_tokens": 2, "ignore_eos": True,
                                                "frobnicate": {"deep": [1]}, "metadata": {"a": "b"}})
        assert out["usage"]["completion_tokens"] == 2
        ignored = [e for e in logs if e["event"] == "ignored unknown request fields"]
        assert ignored and ignored[0]["fields"] == ["frobnicate", "metadata"]
    finally:
        await server.runner.cleanup()
    await wait_until_idle(tiny_engine)
