"""What the engine streams back for a request: one delta per step that produced a token."""

from __future__ import annotations

import msgspec


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float


class SampleLogprobs(msgspec.Struct, frozen=True):
    """Log-probabilities of one sampled position, from the model's raw distribution (before penalties,
    temperature and filtering, as vLLM reports them by default)."""

    token_id: int
    logprob: float
    top: list[TokenLogprob]  # the k most likely tokens, most likely first


class PromptLogprob(msgspec.Struct, frozen=True):
    """A prompt token's raw logprob given the tokens before it, its rank, and the top k there."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[TokenLogprob]


class RequestOutput(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float
    scheduled_time: float | None = None  # first admitted to the running batch
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    logprobs: list[SampleLogprobs] | None = None  # one per new token when the request asked for them
    # prompt_logprobs: on the first output only; one per prompt token, the first None
    prompt_logprobs: list[PromptLogprob | None] | None = None


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A finished request, as the offline ``LLM.generate`` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
