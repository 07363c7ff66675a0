"""Client-facing errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every way a request can fail before or outside the engine ends up as an ``ApiError``; the
middleware in ``app.py`` turns it into a response, so handlers just raise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec
from aiohttp import web

from conveyor.runtime.server.protocol import ErrorBody, ErrorResponse
from conveyor.scheduler import InvalidRequestError

_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

# msgspec names the offending field as a JSON path: "Expected `int`, got `str` - at `$.n`".
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = ErrorResponse(error=ErrorBody(
            message=self.message, type=_TYPES.get(self.status, "invalid_request_error"),
            param=self.param, code=self.code,
        ))
        return web.Response(status=self.status, body=msgspec.json.encode(body),
                            content_type="application/json", headers=self.headers)


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def from_validation_error(err: msgspec.ValidationError) -> ApiError:
    """A wrong type or missing field in the body: 400 naming the field's path (``messages[0].role``)."""
    text = str(err)
    param: str | None = None
    if (m := _AT_PATH.search(text)) is not None:
        param = m.group("path") or None
        text = text[: m.start()]
    if (m := _MISSING.search(text)) is not None:
        prefix = f"{param}." if param else ""
        param = prefix + m.group("field")
    return bad_request(param, f"{text} (field: {param})" if param else text)


def from_invalid_request(err: InvalidRequestError, renames: Mapping[str, str] | None = None) -> ApiError:
    """The engine's validation names its own field (``prompt``, ``max_tokens``); say the client's."""
    field = err.field
    for engine_name, wire_name in (renames or {}).items():
        if field == engine_name or field.startswith(engine_name + "["):
            field = wire_name + field[len(engine_name):]
            break
    return bad_request(field, f"{field}: {err.message}")
