"""Tool calls: the tool list and history in the prompt, the grammar that enforces ``required`` or a
named choice, and the parser that reads calls back out of the output (vLLM's ``hermes`` parser:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as Qwen, Hermes and SmolLM2 write them).

``tool_choice``: ``auto`` lets the model answer or call (parsed; with a ``strict`` tool, a call, once
begun with ``<tool_call>``, is held to the tool's schema by an xgrammar structural tag); ``required`` constrains the output
to a JSON array of calls, a named function to that function's arguments (vLLM's way: the output is
then plain JSON, not tagged); ``none`` keeps the tools in the prompt and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from conveyor.runtime.server.errors import bad_request
from conveyor.runtime.server.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall
from conveyor.scheduler import StructuredSpec

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
# The default model's template knows nothing of tools; its family (SmolLM2) was trained on this
# Hermes-style system prompt, and so were Qwen and Hermes.
HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>{tools}</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolSetup:
    tools: list[dict[str, Any]]  # OpenAI's shape, as chat templates take them
    choice: str  # none | auto | required | named
    named: str | None  # the function, for a named choice
    parallel: bool
    strict: bool = False  # some tool asked for strict arguments

    @property
    def parses(self) -> bool:
        return self.choice != "none"


def tool_setup(body: ChatCompletionRequest) -> ToolSetup | None:
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise bad_request("tool_choice", "tool_choice: is only allowed when tools are given")
        return None
    names: list[str] = []
    for i, t in enumerate(body.tools):
        if t.type != "function":
            raise bad_request(f"tools[{i}].type", f"tools[{i}].type: only function tools are supported, got {t.type!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", t.function.name):
            raise bad_request(f"tools[{i}].function.name", f"tools[{i}].function.name: must be 1-64 of a-z, A-Z, "
                              "0-9, _, ., -")
        if t.function.name in names:
            raise bad_request(f"tools[{i}].function.name", f"tools[{i}].function.name: {t.function.name!r} twice")
        names.append(t.function.name)
    choice, named = "auto", None
    tc = body.tool_choice
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise bad_request("tool_choice", f"tool_choice: must be none, auto, required or a named function, "
                              f"got {tc!r}")
        choice = tc
    elif tc is not None:
        if tc.type != "function" or tc.function.name not in names:
            raise bad_request("tool_choice", f"tool_choice: names function {tc.function.name!r}, which is not in tools")
        choice, named = "named", tc.function.name
    tools = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description or "",
        "parameters": t.function.parameters or {"type": "object", "properties": {}},
    }} for t in body.tools]
    parallel = body.parallel_tool_calls is not False
    return ToolSetup(tools, choice, named, parallel, strict=any(t.function.strict for t in body.tools))


def _params(setup: ToolSetup, name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in setup.tools if t["function"]["name"] == name)


def tool_constraint(setup: ToolSetup) -> StructuredSpec | None:
    """``required``: a JSON array of {name, arguments} calls; named: the arguments object; ``auto``
    with a strict tool: a structural tag. None: the output is not constrained."""
    if setup.choice == "named":
        assert setup.named is not None
        return StructuredSpec(kind="json_schema", value=json.dumps(_params(setup, setup.named)),
                              field="tool_choice")
    if setup.choice == "auto" and setup.strict:
        # Free text, but from "<tool_call>" on, a call in the Hermes format with schema-valid arguments.
        tags = [{"type": "tag",
                 "begin": f'{TOOL_CALL_START}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                 "content": {"type": "json_schema", "json_schema": t["function"]["parameters"]},
                 "end": f"}}\n{TOOL_CALL_END}"} for t in setup.tools]
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [TOOL_CALL_START],
                                                    "tags": tags, "at_least_one": False,
                                                    "stop_after_first": not setup.parallel}}
        return StructuredSpec(kind="structural_tag", value=json.dumps(tag), field="tools")
    if setup.choice != "required":
        return None
    call = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for t in setup.tools]}
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not setup.parallel:
        schema["maxItems"] = 1
    return StructuredSpec(kind="json_schema", value=json.dumps(schema), field="tool_choice")


def template_knows_tools(tokenizer: Any, template: str | None) -> bool:
    source = template if template is not None else getattr(tokenizer, "chat_template", None) or ""
    return "tools" in source


def render_history(messages: list[dict[str, Any]], typed: list[ChatMessage], setup: ToolSetup | None,
                   native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (already plain dicts) with tool calls and results put where the template reads them.

    ``native``: the template renders ``tools``, ``tool_calls`` and ``tool`` turns itself (HF's
    convention: arguments as a dict). Otherwise they are written in the Hermes format as text.
    Returns (messages, tools for the template or None).
    """
    out: list[dict[str, Any]] = []
    for msg, m in zip(messages, typed):
        msg = dict(msg)
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _loads_args(c.function.arguments)} for c in m.tool_calls]
            if native:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                                     for c, call in zip(m.tool_calls, calls)]
            else:
                blocks = "\n".join(f"{TOOL_CALL_START}\n{json.dumps(call)}\n{TOOL_CALL_END}" for call in calls)
                msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + blocks
        if m.role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if not native:
                msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
        out.append(msg)
    if setup is None:
        return out, None
    if native:
        return out, setup.tools
    system = HERMES_SYSTEM.format(tools=json.dumps(setup.tools))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, None


def _loads_args(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # a template that wants a dict gets the text; it still says what was called


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_output(setup: ToolSetup, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a finished choice's text; text that does not parse stays content."""
    if setup.choice == "named":
        assert setup.named is not None
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut off by max_tokens: the caller sees the broken arguments as content
        return None, [ToolCall(id=new_call_id(), function=FunctionCall(name=setup.named, arguments=text))]
    if setup.choice == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [_call(item) for item in items if _is_call(item, setup)]
    calls: list[ToolCall] = []
    for block in _BLOCK.findall(text):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError:
            return text.strip() or None, []  # one broken block: hand back everything as text
        for item in obj if isinstance(obj, list) else [obj]:
            if not _is_call(item, setup):
                return text.strip() or None, []
            calls.append(_call(item))
    if not calls:
        return text, []
    content = _BLOCK.sub("", text).strip()
    if not setup.parallel:
        calls = calls[:1]  # parallel_tool_calls false: at most one call, as OpenAI promises
    return content or None, calls


def _is_call(item: Any, setup: ToolSetup) -> bool:
    names = {t["function"]["name"] for t in setup.tools}
    args = item.get("arguments", item.get("parameters")) if isinstance(item, dict) else None
    return isinstance(item, dict) and item.get("name") in names and isinstance(args, (dict, str))


def _call(item: dict[str, Any]) -> ToolCall:
    args = item.get("arguments", item.get("parameters"))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=item["name"], arguments=text))


def safe_content_prefix(text: str) -> int:
    """How much of ``text`` (auto mode, streaming) can go out as content: everything before a tool
    call, holding back a tail that could be the start of ``<tool_call>``."""
    at = text.find(TOOL_CALL_START)
    if at >= 0:
        return at
    for k in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-k:]):
            return len(text) - k
    return len(text)
