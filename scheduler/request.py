"""A request and its life: WAITING -> RUNNING -> FINISHED; RUNNING -> WAITING on preemption.

Disaggregated (``remote_prefill`` set, on a decode worker): WAITING -> AWAIT_KV (admitted, pages
reserved, a peer computes the prompt into them) -> RUNNING with the peer's first token, or
FINISHED (abort, failure). On a prefill worker ``kv_push`` names where its KV goes; it finishes
after one token, and keeps its pages (``kv_hold``) until the transport is done reading them.

Two lengths drive scheduling, and neither needs a sampled token's value:
- ``num_tokens``: tokens that exist (prompt + every sample *launched*); advanced at launch.
- ``num_computed_tokens``: tokens whose KV is written or being written by a launched batch.
Token values arrive later, in ``output_token_ids``, when the output stage reads them back.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from conveyor.scheduler.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    AWAIT_KV = "await_kv"  # decode worker: admitted, its prompt's KV arriving from a prefill peer
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client went away or asked
    ERROR = "error"  # the engine failed this request


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    tenant: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_computed_tokens: int = 0
    slot: int | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0  # also the request's epoch: samples launched before a preemption are stale
    num_inflight: int = 0  # launched batches holding this request whose outputs are not processed yet
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    swapped: tuple[int, int] | None = None  # (swap handle, tokens whose KV it holds) while swapped out
    admit_time: float | None = None  # first admission (the end of its queueing), on the scheduler's clock
    first_token_time: float | None = None
    finish_time: float | None = None
    # The structured-output matcher (runtime/engine/grammar.py), advanced by the output stage with each
    # token it keeps; None for unconstrained requests.
    grammar: Any = None
    # prompt_logprobs: entry p is prompt token p's logprob given the tokens before it (0 stays None);
    # filled by position as batches are read back, so a recompute never records a position twice.
    prompt_logprobs: list[Any] | None = None
    num_prompt_logprobs: int = 0  # entries filled
    # Disaggregation (runtime/disagg), opaque to the scheduler beyond "is it set": on D, where the
    # prompt's KV comes from; on P, where it goes. ``kv_hold``: P's transport still reads its pages.
    remote_prefill: Any = None
    kv_push: Any = None
    kv_hold: bool = False
    # The stop strings' automaton (runtime.engine.stop_matcher), built by the input processor so the
    # engine thread never spends time on it; None: built on demand.
    stop_matcher: Any = None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions whose logprobs are still missing: the prefix cache must not skip them."""
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens - 1

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_launched_outputs(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def remaining_new_tokens(self) -> int:
        return self.max_new_tokens - self.num_launched_outputs

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def known_token_ids(self) -> list[int]:
        """Every token whose value the host knows: what a recompute after preemption replays."""
        return self.prompt_token_ids + self.output_token_ids
