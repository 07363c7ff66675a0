"""Honour or refuse: unknown field names, fields that are declared but not implemented, and the
structured-output fields turned into one engine constraint.

A field that would change the answer is never ignored in silence: unknown names are a 400 naming
them (OpenAI's behaviour) unless the server runs with ``--ignore-unknown-fields`` (vLLM's), which
accepts and logs them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import msgspec
import msgspec.inspect as mi
import structlog

from conveyor.runtime.server.errors import bad_request
from conveyor.runtime.server.protocol import ChatCompletionRequest, CompletionRequest, GenerationFields
from conveyor.scheduler import StructuredSpec

log = structlog.get_logger("conveyor.server")

GUIDED_BACKENDS = frozenset({"xgrammar", "auto"})


@lru_cache(maxsize=None)
def _info(kind: type) -> mi.Type:
    return mi.type_info(kind)


def unknown_fields(obj: Any, kind: type) -> list[str]:
    """Paths (``foo``, ``messages[1].bar``) of every key in ``obj`` that ``kind`` does not declare."""
    out: list[str] = []
    _walk(obj, _info(kind), "", out)
    return out


def _walk(obj: Any, t: mi.Type, path: str, out: list[str]) -> None:
    if isinstance(t, mi.UnionType):
        for sub in t.types:
            if (isinstance(sub, mi.StructType) and isinstance(obj, dict)) or \
                    (isinstance(sub, mi.ListType) and isinstance(obj, list)):
                _walk(obj, sub, path, out)
                return
        return
    if isinstance(t, mi.StructType) and isinstance(obj, dict):
        fields = {f.encode_name: f for f in t.fields}
        for key, value in obj.items():
            name = f"{path}.{key}" if path else str(key)
            if (f := fields.get(key)) is None:
                out.append(name)
            else:
                _walk(value, f.type, name, out)
    elif isinstance(t, mi.ListType) and isinstance(obj, list):
        for i, item in enumerate(obj):
            _walk(item, t.item_type, f"{path}[{i}]", out)


def check_unknown_fields(obj: Any, kind: type, ignore: bool, path: str) -> None:
    if not isinstance(obj, dict):
        return  # not an object: msgspec's conversion says so, naming the type
    unknown = unknown_fields(obj, kind)
    if not unknown:
        return
    if ignore:
        log.warning("ignored unknown request fields", fields=unknown, path=path)
        return
    names = ", ".join(f"`{u}`" for u in unknown)
    raise bad_request(unknown[0], f"Unrecognized request argument supplied: {names} (field: {unknown[0]}; "
                      "start the server with --ignore-unknown-fields to accept and log them)")


def refuse_unsupported(body: GenerationFields) -> None:
    """Declared so that clients get a clear 400, not an unknown-field one; none of them is ignored."""
    if body.best_of is not None and body.best_of != 1:
        raise bad_request("best_of", "best_of: is not supported (vLLM V1 removed it); use n")
    if body.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern", "guided_whitespace_pattern: is not supported "
                          "(JSON is generated without optional whitespace)")
    if body.guided_decoding_backend is not None and body.guided_decoding_backend not in GUIDED_BACKENDS:
        raise bad_request("guided_decoding_backend", f"guided_decoding_backend: this server uses xgrammar, "
                          f"not {body.guided_decoding_backend!r}")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise bad_request("suffix", "suffix: is not supported (no fill-in-the-middle)")
    if isinstance(body, ChatCompletionRequest):
        if body.add_generation_prompt is not None and body.continue_final_message and body.add_generation_prompt:
            raise bad_request("continue_final_message", "continue_final_message: cannot be combined with "
                              "add_generation_prompt true")


def structured_spec(body: GenerationFields) -> StructuredSpec | None:
    """response_format, structured_outputs and guided_* -> at most one constraint (two is a 400)."""
    specs: list[StructuredSpec] = []
    rf = body.response_format
    if rf is not None:
        if rf.type == "json_object":
            specs.append(StructuredSpec(kind="json_object", field="response_format"))
        elif rf.type == "json_schema":
            js = rf.json_schema
            if js is None or js.schema_ is None:
                raise bad_request("response_format.json_schema.schema",
                                  "response_format.json_schema.schema: is required for type json_schema")
            specs.append(_schema(js.schema_, "response_format.json_schema.schema"))
        elif rf.type != "text":
            raise bad_request("response_format.type", f"response_format.type: must be text, json_object or "
                              f"json_schema, got {rf.type!r}")
    so = body.structured_outputs
    named: list[tuple[str, Any]] = []
    if so is not None:
        named += [(f"structured_outputs.{k}", getattr(so, k)) for k in ("json", "regex", "choice", "grammar")]
        if so.json_object:
            specs.append(StructuredSpec(kind="json_object", field="structured_outputs.json_object"))
    named += [("guided_json", body.guided_json), ("guided_regex", body.guided_regex),
              ("guided_choice", body.guided_choice), ("guided_grammar", body.guided_grammar)]
    for field, value in named:
        if value is None:
            continue
        kind = field.rsplit(".", 1)[-1].removeprefix("guided_")
        if kind == "json":
            specs.append(_schema(value, field))
        elif kind == "choice":
            if not value or not all(value):
                raise bad_request(field, f"{field}: must be a non-empty list of non-empty strings")
            specs.append(StructuredSpec(kind="choice", value=json.dumps(value), field=field))
        else:
            if not value:
                raise bad_request(field, f"{field}: is empty")
            specs.append(StructuredSpec(kind=kind, value=value, field=field))
    if len(specs) > 1:
        raise bad_request(specs[1].field, f"{specs[1].field}: only one output constraint per request "
                          f"(already given {specs[0].field})")
    return specs[0] if specs else None


def _schema(schema: Any, field: str) -> StructuredSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise bad_request(field, f"{field}: is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(field, f"{field}: must be a JSON schema object")
    return StructuredSpec(kind="json_schema", value=msgspec.json.encode(schema).decode(), field=field)
