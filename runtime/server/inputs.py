"""Wire request -> engine requests: defaults, field checks, tokenization and the fan-out of choices.

Everything here runs before anything reaches the engine, so a bad field costs the engine
nothing: either every choice's ``Request`` is built, or an ``ApiError`` names the field.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from conveyor.runtime.engine.client import EngineClient
from conveyor.runtime.engine.input_processor import Prompt
from conveyor.runtime.server.errors import ApiError, bad_request, from_invalid_request
from conveyor.runtime.server.fields import refuse_unsupported, structured_spec
from conveyor.runtime.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationFields,
)
from conveyor.runtime.server.tools import (
    ToolSetup,
    render_history,
    template_knows_tools,
    tool_constraint,
    tool_setup,
)
from conveyor.scheduler import (
    InvalidRequestError,
    Request,
    SamplingParams,
    StructuredSpec,
)

if TYPE_CHECKING:
    from conveyor.runtime.server.app import ServerSettings

MAX_CHOICES = 128  # prompts x n in one HTTP request; more is a batch job, not a request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default (chat: up to the context)
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Plan:
    """What one HTTP request fans out to: one engine request per choice, prompt-major then n."""

    response_id: str
    requests: list[Request]
    num_prompt_tokens: int  # each prompt counted once, however many choices share it
    stream: bool
    include_usage: bool
    logprobs: bool
    continuous_usage: bool = False  # usage on every chunk (stream_options.continuous_usage_stats)
    echo: list[str] | None = None  # completions with echo: each choice's prompt text, put before its output
    prompt_logprobs: bool = False  # the client asked for prompt_logprobs (echo + logprobs computes them too)
    tools: ToolSetup | None = None  # chat with tools: the output is parsed for calls


def completion_plan(engine: EngineClient, body: CompletionRequest, settings: ServerSettings | None = None) -> Plan:
    check_model(engine, body)
    refuse_unsupported(body)
    prompts = split_prompts(body.prompt)
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, renames={},
                             structured=structured_spec(body))
    if body.echo and body.logprobs is not None:  # OpenAI's echo logprobs cover the prompt tokens too
        params = msgspec.structs.replace(params, prompt_logprobs=max(body.logprobs, params.prompt_logprobs or 0))
    rid = f"cmpl-{uuid.uuid4().hex}"
    plan = _build_plan(engine, body, rid, params, [(p, None) for p in prompts], renames={}, logprobs=body.logprobs)
    plan = _replace(plan, prompt_logprobs=body.prompt_logprobs is not None)
    if body.echo:
        texts = []
        for req in plan.requests:
            prompt = prompts[int(req.request_id.rsplit("-", 1)[1]) // (body.n or 1)]
            # The prompt as the model saw it: the client's text unless truncation cut it.
            whole = isinstance(prompt, str) and len(req.prompt_token_ids) == len(engine.tokenizer.encode(prompt))
            texts.append(prompt if whole else _decode(engine, req.prompt_token_ids))
        plan = _replace(plan, echo=texts)
    return plan


def chat_plan(engine: EngineClient, body: ChatCompletionRequest, settings: ServerSettings | None = None) -> Plan:
    check_model(engine, body)
    refuse_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs", "top_logprobs: needs logprobs set to true")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    renames = {"prompt": "messages", "max_tokens": max_field, "logprobs": "top_logprobs"}
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tools = tool_setup(body)
    structured = structured_spec(body)
    if tools is not None and (forced := tool_constraint(tools)) is not None:
        if structured is not None:
            raise bad_request(structured.field, f"{structured.field}: cannot be combined with tool_choice "
                              f"{tools.choice!r} (which constrains the output itself)")
        structured = forced
    params = sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, renames=renames, structured=structured)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    options = chat_options(engine, body, settings, tools)
    messages, template_tools = render_history(chat_messages(body.messages), body.messages, tools,
                                              native="tools" in options)
    if template_tools is None:
        options.pop("tools", None)
    plan = _build_plan(engine, body, rid, params, [(None, messages)], renames, logprobs, chat=options)
    return _replace(plan, tools=tools if tools is not None and tools.parses else None,
                    prompt_logprobs=body.prompt_logprobs is not None)


# apply_chat_template keywords that have request fields of their own, or that the server sets.
_OWN_TEMPLATE_KEYS = frozenset({"messages", "conversation", "tokenize", "return_dict", "tools", "documents",
                                "chat_template", "add_generation_prompt", "continue_final_message"})


def chat_options(engine: EngineClient, body: ChatCompletionRequest, settings: ServerSettings | None,
                 tools: ToolSetup | None) -> dict[str, Any]:
    """apply_chat_template's keywords for this request; the template's own variables come last."""
    template = body.chat_template if body.chat_template is not None else (settings.chat_template if settings else None)
    options: dict[str, Any] = {}
    if template is not None:
        options["chat_template"] = template
    if body.continue_final_message:
        if not body.messages or body.messages[-1].role != "assistant":
            raise bad_request("continue_final_message", "continue_final_message: the last message must be "
                              "the assistant's")
        options["continue_final_message"] = True
        options["add_generation_prompt"] = False
    elif body.add_generation_prompt is not None:
        options["add_generation_prompt"] = body.add_generation_prompt
    if tools is not None and template_knows_tools(engine.tokenizer, template):
        options["tools"] = tools.tools
    for key, value in (body.chat_template_kwargs or {}).items():
        if key in options or key in _OWN_TEMPLATE_KEYS:
            raise bad_request("chat_template_kwargs", f"chat_template_kwargs: {key!r} is set by the request "
                              "itself and cannot be passed here")
        options[key] = value
    return options


def _decode(engine: EngineClient, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


def _replace(plan: Plan, **changes: Any) -> Plan:
    return dataclasses.replace(plan, **changes)


def check_model(engine: EngineClient, body: GenerationFields) -> None:
    if body.model is not None and body.model != engine.model_name:
        raise ApiError(404, f"The model `{body.model}` does not exist; this server serves `{engine.model_name}`.",
                       param="model", code="model_not_found")


def split_prompts(prompt: Any) -> list[Prompt]:
    """OpenAI's four prompt shapes: "text", ["text", ...], [ids], [[ids], ...]."""
    if prompt is None:
        raise bad_request("prompt", "prompt: is required")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt", "prompt: is empty")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return list(prompt)
    raise bad_request("prompt", "prompt: must be a string, a list of strings, a list of token ids "
                      "or a list of token-id lists (not a mix)")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Typed messages -> the dicts a chat template reads; text parts are joined, others refused."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role", f"messages[{i}].role: unknown role {m.role!r} "
                              f"(expected one of {', '.join(sorted(CHAT_ROLES))})")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}]",
                                      f"messages[{i}].content[{j}]: only text parts are supported, got {part.type!r}")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""  # an assistant turn that only called tools has no content
        # Templates written for OpenAI's older roles know "system", not "developer".
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def sampling_params(body: GenerationFields, *, max_tokens: int | None, logprobs: int | None,
                    renames: dict[str, str], structured: StructuredSpec | None = None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias: dict[int, float] | None = None
    if body.logit_bias is not None:
        bias = {}
        for key, value in body.logit_bias.items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise bad_request("logit_bias", f"logit_bias: keys must be token ids, got {key!r}") from None
    given = {
        "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "seed": body.seed, "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos, "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
        "logprobs": logprobs, "logit_bias": bias, "min_tokens": body.min_tokens, "structured": structured,
        "prompt_logprobs": body.prompt_logprobs,
    }
    try:
        return SamplingParams(stop=stop, **{k: v for k, v in given.items() if v is not None})
    except InvalidRequestError as e:
        raise from_invalid_request(e, renames) from None


def _build_plan(engine: EngineClient, body: GenerationFields, rid: str, params: SamplingParams,
             prompts: list[tuple[Prompt | None, list[dict[str, Any]] | None]], renames: dict[str, str],
             logprobs: int | None, chat: dict[str, Any] | None = None) -> Plan:
    n = 1 if body.n is None else body.n
    if n < 1:
        raise bad_request("n", f"n: must be at least 1, got {n}")
    if n * len(prompts) > MAX_CHOICES:
        raise bad_request("n", f"n: {n} choices for {len(prompts)} prompts exceeds {MAX_CHOICES}")
    priority = body.priority or 0
    requests: list[Request] = []
    num_prompt_tokens = 0
    try:
        for p, (prompt, messages) in enumerate(prompts):
            first = engine.make_request(prompt, _choice_params(params, 0), messages=messages,
                                        request_id=f"{rid}-{p * n}", priority=priority, tenant=body.user,
                                        chat_options=chat, truncate_prompt_tokens=body.truncate_prompt_tokens)
            requests.append(first)
            num_prompt_tokens += first.num_prompt_tokens
            # The other n-1 choices reuse the first one's token ids instead of tokenizing again.
            for i in range(1, n):
                requests.append(engine.make_request(
                    first.prompt_token_ids, _choice_params(params, i), request_id=f"{rid}-{p * n + i}",
                    priority=priority, tenant=body.user,
                ))
    except InvalidRequestError as e:
        if len(prompts) > 1 and e.field == "prompt":
            e = InvalidRequestError(f"prompt[{p}]", e.message)
        raise from_invalid_request(e, renames) from None
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    if opts is not None and not body.stream and (include_usage or continuous):
        raise bad_request("stream_options", "stream_options: only allowed when stream is true")
    return Plan(rid, requests, num_prompt_tokens, bool(body.stream), include_usage, logprobs is not None,
                continuous_usage=continuous)


def _choice_params(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i samples with seed+i, so n seeded choices differ from each other yet replay exactly."""
    if params.seed is None or i == 0:
        return params
    return msgspec.structs.replace(params, seed=params.seed + i)
