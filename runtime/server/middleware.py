"""What every HTTP request passes through, outermost first.

``observe``: the request id (``X-Request-Id`` taken or made, echoed, bound to every log line as
``x_request_id``), ``ApiError`` -> OpenAI's error shape, one access-log line, one line per
rejection, HTTP metrics. ``cors``: answers preflights for ``--allowed-origins``. ``auth``:
``--api-key`` (constant-time compare; ``open_paths`` stay open). ``loading``: 503 until the engine
has loaded, so a health probe sees "loading", not "connection refused".
"""

from __future__ import annotations

import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from conveyor.runtime.server.errors import ApiError

if TYPE_CHECKING:
    from conveyor.runtime.server.app import ServerState

log = structlog.get_logger("conveyor.server")
access_log = structlog.get_logger("conveyor.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StateOf = Callable[[web.Request], "ServerState"]

REQUEST_ID = "X-Request-Id"
_REQUEST_ID_KEY = web.RequestKey("x_request_id", str)
_GOOD_ID = re.compile(r"[A-Za-z0-9._:/=+\-]{1,128}")  # echoed in a header and logged: nothing else gets through
# Routes that answer while the model loads: what a prober or scraper needs before the engine exists.
_OPEN_WHILE_LOADING = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/ping"})
# Probes and scrapes come every few seconds: their access lines are debug, not info.
_QUIET = frozenset({"/health", "/metrics", "/ping"})
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-Request-Id"


def request_id(request: web.Request) -> str:
    return request.get(_REQUEST_ID_KEY, "")


def middlewares(state_of: StateOf) -> list[Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]]:
    """The chain for ``web.Application(middlewares=...)``; ``state_of`` finds the server's state."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = state_of(request)
        given = request.headers.get(REQUEST_ID, "")
        rid = given if _GOOD_ID.fullmatch(given) else uuid.uuid4().hex
        request[_REQUEST_ID_KEY] = rid
        start = time.perf_counter()
        with structlog.contextvars.bound_contextvars(x_request_id=rid):
            try:
                resp = await handler(request)
            except ApiError as e:
                _log_rejection(request, e)
                resp = e.response()
            except web.HTTPException as e:  # aiohttp's own: unknown route (404), wrong method (405), ...
                if e.status < 400:
                    raise
                err = ApiError(e.status, e.reason, code=None,
                               headers={k: v for k, v in e.headers.items() if k == "Allow"})
                _log_rejection(request, err)
                resp = err.response()
            except Exception:
                log.exception("unhandled error in handler", path=request.path)
                resp = ApiError(500, "Internal server error.", code="internal_error").response()
            elapsed = time.perf_counter() - start
            state.metrics.observe(_handler_name(request), request.method, resp.status, elapsed)
            # A prober polls, and may poll fast while the model loads: its lines must not flood the log.
            level = "debug" if request.path in _QUIET and (resp.status < 500 or state.engine is None) else "info"
            getattr(access_log, level)(
                "http request", method=request.method, path=request.path, status=resp.status,
                duration_s=round(elapsed, 4), bytes=_body_bytes(resp), remote=request.remote,
            )
        return resp

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = request.headers.get("Origin", "")
            allowed = _allowed_origin(state_of(request).settings.allowed_origins, origin)
            if allowed is None:
                raise ApiError(403, f"Origin {origin!r} is not allowed (the server's --allowed-origins).",
                               code="cors_forbidden")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": allowed,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", CORS_HEADERS),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        return await handler(request)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        settings = state_of(request).settings
        if settings.api_key and request.path not in settings.open_paths:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            # compare_digest on bytes: the time it takes says nothing about how much of the key matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                raise ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    @web.middleware
    async def loading(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = state_of(request)
        if state.engine is None and request.path not in _OPEN_WHILE_LOADING:
            raise ApiError(503, "The model is loading; retry shortly.", code="loading",
                           headers={"Retry-After": str(state.settings.retry_after_s)})
        return await handler(request)

    return [observe, cors, auth, loading]


async def on_response_prepare(request: web.Request, response: web.StreamResponse, state: "ServerState") -> None:
    """Headers every response carries, streams included (this runs as their headers go out)."""
    if (rid := request.get(_REQUEST_ID_KEY)) is not None:
        response.headers[REQUEST_ID] = rid
    origin = request.headers.get("Origin")
    if origin is not None and (allowed := _allowed_origin(state.settings.allowed_origins, origin)) is not None:
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = REQUEST_ID
        response.headers.add("Vary", "Origin")


def _allowed_origin(allowed: tuple[str, ...], origin: str) -> str | None:
    if "*" in allowed:
        return "*"
    return origin if origin and origin in allowed else None


def _log_rejection(request: web.Request, err: ApiError) -> None:
    # 4xx is the client's doing (warning); 5xx is ours (error). Either way one line says why.
    if err.code == "loading" and request.path in _QUIET:  # a prober waiting out the load, every second
        fn = log.debug
    elif err.status >= 500 and err.code not in ("loading", "shutting_down", "queue_full", "unhealthy"):
        fn = log.error
    else:
        fn = log.warning
    fn("request rejected", method=request.method, path=request.path, status=err.status, code=err.code,
       param=err.param, message=err.message)


def _handler_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    # An unmatched path is one label, whatever it was: scanners must not grow the series without bound.
    return resource.canonical if resource is not None else "unmatched"


def _body_bytes(resp: web.StreamResponse) -> int:
    if resp.prepared:  # a stream: what was written
        return resp.body_length
    if isinstance(resp, web.Response) and resp.body is not None:
        body = resp.body
        return len(body) if isinstance(body, (bytes, bytearray)) else (resp.content_length or 0)
    return resp.content_length or 0
