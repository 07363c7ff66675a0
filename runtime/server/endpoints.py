"""Operational endpoints: ``/tokenize``, ``/detokenize``, ``/version``, ``/server_info``,
``/v1/models/{model_id}`` and ``/openapi.json``, with the wire types they alone use.

Shapes follow vLLM's (``/tokenize`` takes ``prompt`` or ``messages`` and answers ``count``,
``max_model_len``, ``tokens``), so tools written against vLLM work here. ``/openapi.json`` is
generated from the msgspec wire types, so it cannot drift from what the server decodes.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import msgspec
from aiohttp import web

from conveyor.runtime.disagg.wire import KVAbort, KVReady, RoomAccepted
from conveyor.runtime.server.errors import ApiError, bad_request, from_invalid_request
from conveyor.runtime.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from conveyor.scheduler import InvalidRequestError


# -- wire types -----------------------------------------------------------------------------
class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's two tokenize requests in one: exactly one of ``prompt`` or ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt: default true; messages: the template writes them
    add_generation_prompt: bool | None = None  # messages only; default true
    return_token_strs: bool | None = None


class TokenizeResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


class VersionResponse(msgspec.Struct, kw_only=True):
    version: str


class ServerInfo(msgspec.Struct, kw_only=True):
    """What a router or an operator asks a replica: what it serves and how it is configured."""

    model: str
    served_model_name: str
    max_model_len: int
    version: str
    versions: dict[str, str]
    engine_config: dict[str, Any]
    server_settings: dict[str, Any]
    kv_pages_total: int
    block_size: int


def version() -> str:
    try:
        return metadata.version("conveyor")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0+unknown"


def _versions() -> dict[str, str]:
    out = {"conveyor": version(), "python": platform.python_version()}
    for dist in ("torch", "transformers", "aiohttp", "msgspec", "flashinfer-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# -- routes ---------------------------------------------------------------------------------
def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_get("/version", _version)
    app.router.add_get("/server_info", _server_info)
    app.router.add_get("/get_server_info", _server_info)  # sglang's name for it, which sglang-router asks
    app.router.add_get("/v1/models/{model_id:.+}", _model)  # ids can hold slashes (org/name)
    app.router.add_get("/openapi.json", _openapi)


def _state(request: web.Request):
    from conveyor.runtime.server.app import STATE

    return request.app[STATE]


async def _tokenize(request: web.Request) -> web.Response:
    from conveyor.runtime.server.app import _read_body as read_body
    from conveyor.runtime.server.inputs import chat_messages

    state = _state(request)
    engine = state.engine
    body = await read_body(request, TokenizeRequest)
    _check_model(engine, body.model)
    tok = engine.tokenizer
    if tok is None:
        raise bad_request("prompt", "this model has no tokenizer")
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("prompt", "give exactly one of prompt or messages")
    try:
        if body.messages is not None:
            if body.add_generation_prompt is False or body.add_special_tokens:
                text = tok.apply_chat_template(chat_messages(body.messages), tokenize=False,
                                               add_generation_prompt=body.add_generation_prompt is not False)
                ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
            else:  # the same ids a chat completion would prefill
                ids = engine.token_ids(messages=chat_messages(body.messages))
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    except InvalidRequestError as e:
        raise from_invalid_request(e) from None
    except ApiError:
        raise
    except Exception as e:  # a chat template that rejects the conversation
        raise bad_request("messages", f"messages: the chat template rejected them: {e}") from None
    strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return _json(TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                  token_strs=strs))


async def _detokenize(request: web.Request) -> web.Response:
    from conveyor.runtime.server.app import _read_body as read_body

    state = _state(request)
    engine = state.engine
    body = await read_body(request, DetokenizeRequest)
    _check_model(engine, body.model)
    if engine.tokenizer is None:
        raise bad_request("tokens", "this model has no tokenizer")
    vocab = engine.vocab_size
    for i, t in enumerate(body.tokens):
        if not 0 <= t < vocab:
            raise bad_request(f"tokens[{i}]", f"tokens[{i}]: token id {t} is outside the vocabulary [0, {vocab})")
    return _json(DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens)))


async def _version(request: web.Request) -> web.Response:
    return _json(VersionResponse(version=version()))


async def _server_info(request: web.Request) -> web.Response:
    state = _state(request)
    engine = state.engine
    settings = msgspec.to_builtins(state.settings)
    settings["api_key"] = "<set>" if state.settings.api_key else None  # never the key itself
    cfg = engine.config
    return _json(ServerInfo(
        model=cfg.model, served_model_name=engine.model_name, max_model_len=engine.max_model_len,
        version=version(), versions=_versions(), engine_config=msgspec.to_builtins(cfg), server_settings=settings,
        kv_pages_total=engine.stats().kv_pages_total, block_size=cfg.block_size,
    ))


async def _model(request: web.Request) -> web.Response:
    state = _state(request)
    model_id = request.match_info["model_id"]
    if model_id != state.engine.model_name:
        raise ApiError(404, f"The model `{model_id}` does not exist; this server serves "
                       f"`{state.engine.model_name}`.", param="model", code="model_not_found")
    return _json(state.model_card())


def _check_model(engine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{engine.model_name}`.",
                       param="model", code="model_not_found")


def _json(body: msgspec.Struct) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


# -- OpenAPI --------------------------------------------------------------------------------
# (method, path, request body type, response type, streamed chunk type, summary). The fuzz test
# drives every entry, so a route missing here is a route the fuzzer never sees.
ROUTES: list[tuple[str, str, type | None, type | None, type | None, str]] = [
    ("post", "/v1/completions", CompletionRequest, CompletionResponse, CompletionChunk, "Text completion."),
    ("post", "/v1/chat/completions", ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk,
     "Chat completion."),
    ("get", "/v1/models", None, ModelList, None, "The served model."),
    ("get", "/v1/models/{model_id}", None, ModelCard, None, "One model card."),
    ("post", "/tokenize", TokenizeRequest, TokenizeResponse, None, "Prompt or messages -> token ids."),
    ("post", "/detokenize", DetokenizeRequest, DetokenizeResponse, None, "Token ids -> text."),
    ("get", "/version", None, VersionResponse, None, "The server's version."),
    ("get", "/server_info", None, ServerInfo, None, "Engine configuration, model and versions."),
    ("get", "/health", None, None, None, "200 when serving; 503 while loading, draining or dead."),
    ("get", "/metrics", None, None, None, "Prometheus metrics (text format)."),
    ("get", "/openapi.json", None, None, None, "This document."),
    ("post", "/kv/ready", KVReady, RoomAccepted, None,
     "--role prefill: a decode worker hands over a room (runtime/disagg/wire.py); 404 on other roles."),
    ("post", "/kv/abort", KVAbort, RoomAccepted, None, "--role prefill: stop a room; 404 for an unknown one."),
]


def openapi_spec() -> dict[str, Any]:
    types = [t for _, _, req, resp, chunk, _ in ROUTES for t in (req, resp, chunk) if t is not None]
    types.append(ErrorResponse)
    schemas, components = msgspec.json.schema_components(
        list(dict.fromkeys(types)), ref_template="#/components/schemas/{name}")
    ref = dict(zip(dict.fromkeys(types), schemas))
    error = {"description": "An error in OpenAI's shape.", "content": {"application/json": {"schema": ref[ErrorResponse]}}}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, req, resp, chunk, summary in ROUTES:
        op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path.strip('/').replace('/', '_')}"}
        if "{model_id}" in path:
            op["parameters"] = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref[req]}}}
        content: dict[str, Any] = {}
        if resp is not None:
            content["application/json"] = {"schema": ref[resp]}
        if chunk is not None:  # "stream": true answers server-sent events, one chunk per data line
            content["text/event-stream"] = {"schema": ref[chunk]}
        if path == "/metrics":
            content["text/plain"] = {"schema": {"type": "string"}}
        if path == "/openapi.json":
            content["application/json"] = {"schema": {"type": "object"}}
        ok: dict[str, Any] = {"description": "Success."}
        if content:
            ok["content"] = content
        op["responses"] = {"200": ok, "4XX": error, "5XX": error}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": version(),
                 "description": "OpenAI-compatible inference server (generated from the msgspec wire types)."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())
