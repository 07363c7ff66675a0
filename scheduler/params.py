"""Per-request sampling parameters (a wire type: the HTTP layer decodes straight into it).

Every numeric field is checked by range, not only by type, so nothing a client sends can overflow
a sampling tensor or turn the distribution into NaN on the engine thread. The bounds that need
the model (top_k and stop_token_ids against the vocabulary, max_tokens against the context) are
checked by the input processor.
"""

from __future__ import annotations

import math

import msgspec

from scheduler.errors import InvalidRequestError


MAX_LOGPROBS = 20
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
