"""OpenAI wire types: what the server decodes from a body and encodes into responses and SSE chunks.

Request fields are all optional with ``None`` defaults so that an explicit JSON ``null`` means
"use the default", as OpenAI's API treats it; defaults are applied in ``inputs.py``. Unknown
field names are a 400 (``fields.py``; ``--ignore-unknown-fields`` logs them instead), wrong types
fail decoding with the JSON path named. Every declared field is honoured or refused with a 400:
the README's field table says which.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


# -- requests -------------------------------------------------------------------------------
class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage on every chunk


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None  # the schema is always enforced exactly


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GenerationFields(msgspec.Struct, kw_only=True):
    """Fields that completions and chat share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    priority: int | None = None
    user: str | None = None  # the tenant, for fair-share scheduling
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for structured_outputs.*
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: up to the context)
    best_of: int | None = None  # refused unless 1 (vLLM V1 removed it)
    prompt_logprobs: int | None = None  # vLLM: each prompt token's logprob, rank and the top k


# msgspec allows one array-like type per union, so "list of strings | token ids | lists of token
# ids" is decoded as one list of mixed items and sorted out in inputs.split_prompts.
PromptField = str | list[str | int | list[int]]


class CompletionRequest(GenerationFields, kw_only=True):
    prompt: PromptField | None = None
    logprobs: int | None = None  # completions: how many top alternatives per token
    echo: bool | None = None
    suffix: str | None = None  # refused: no fill-in-the-middle


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    # Named so that they are refused by type ("only text parts"), not as unknown fields.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call it answers


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionDef


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    function: NamedFunction


class ChatCompletionRequest(GenerationFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins if both
    logprobs: bool | None = None  # chat: on/off; how many alternatives is top_logprobs
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    chat_template: str | None = None  # a Jinja template for this request
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (enable_thinking, ...)
    add_generation_prompt: bool | None = None  # default true
    continue_final_message: bool | None = None  # extend the last (assistant) message instead


# -- responses ------------------------------------------------------------------------------
class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int


class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # as OpenAI's: prompt tokens the cache served


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)  # echo: the first prompt token's is None
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class PromptLogprobEntry(msgspec.Struct, kw_only=True):
    logprob: float
    rank: int | None = None
    decoded_token: str


# vLLM's prompt_logprobs: one per prompt token (the first None), keyed by token id (as a string):
# the prompt token itself and the top k at that position.
PromptLogprobs = list[dict[str, PromptLogprobEntry] | None]


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's extension: the stop string or token id that hit
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # always set on a full response; on chunks only the usage chunk


class CompletionChunk(msgspec.Struct, kw_only=True):
    """A streamed completion delta; OpenAI gives chunks the same object name as full responses."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprobEntry] | None = None
    refusal: None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaFunction(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunction | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A delta names only what changed: ``{"role": ...}`` first, then ``{"content": ...}``."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "conveyor"
    root: str | None = None  # what was loaded (path or preset), as vLLM's cards say
    parent: str | None = None  # the base model of an adapter; none here
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody
