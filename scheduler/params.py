"""Per-request sampling parameters (a wire type: the HTTP layer decodes straight into it).

Every numeric field is checked by range, not only by type, so nothing a client sends can overflow
a sampling tensor or turn the distribution into NaN on the engine thread. The bounds that need
the model (top_k and stop_token_ids against the vocabulary, max_tokens against the context) are
checked by the input processor.
"""

from __future__ import annotations

import math

import msgspec

from conveyor.scheduler.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request: OpenAI's limit
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")


class StructuredSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on the output: compiled once per distinct spec (runtime/engine/grammar.py) into a grammar.

    ``value``: the JSON schema as JSON text, a regex, an EBNF grammar, the choices as a JSON list,
    an xgrammar structural tag as JSON text (free text with constrained tool calls); unused for
    json_object. ``field`` is the wire field it came from, for the 400 a bad one gets.
    """

    kind: str
    value: str = ""
    field: str = "response_format"
# Below this, logits / temperature overflows fp32 softmax for ordinary logits and sampling
# degenerates (1e-40 only ever yields EOS); 0 is the way to ask for greedy.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_TOP_K = 2**31 - 1  # FlashInfer takes top_k as int32; the vocabulary bounds it further
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as vLLM and torch take it
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 512  # per stop string; the longest one bounds the detokenizer's look-back
MAX_STOP_TOKEN_IDS = 256


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    max_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and the top k
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequestError(name, f"must be a finite number, got {getattr(self, name)}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, "
                                      f"{MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequestError("top_k", f"must be -1, 0 (off) or in [1, {MAX_TOP_K}], got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}], "
                                      f"got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequestError("seed", f"must be a signed 64-bit integer, got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError("stop", f"each stop string must be at most {MAX_STOP_CHARS} characters, "
                                      f"got {max(len(s) for s in self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids",
                                      f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "token ids must be >= 0")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for tid, bias in self.logit_bias.items():
            if tid < 0:
                raise InvalidRequestError("logit_bias", f"token id {tid} must be >= 0")
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError("logit_bias", f"bias for token {tid} must be in [-100, 100], got {bias}")
        if self.min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.structured is not None:
            if self.structured.kind not in STRUCTURED_KINDS:
                raise InvalidRequestError(self.structured.field, f"unknown constraint kind {self.structured.kind!r}")
            # A grammar ends by allowing only EOS; masking EOS as well would leave no token to sample.
            if self.min_tokens:
                raise InvalidRequestError("min_tokens", f"cannot be combined with {self.structured.field}")
            if self.ignore_eos:
                raise InvalidRequestError("ignore_eos", f"cannot be combined with {self.structured.field}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_bias(self) -> bool:
        return bool(self.logit_bias) or self.min_tokens > 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
