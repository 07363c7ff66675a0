"""What the HTTP server and the CLI need of an engine: ``AsyncEngine`` in this process, or (later) a
router that forwards to workers in others. The server depends on this, never on a concrete engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine.executor import KVRegion
from conveyor.runtime.engine.input_processor import Prompt
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.runtime.engine.step_stats import EngineStats
from conveyor.scheduler import Request, SamplingParams


class EngineDeadError(RuntimeError):
    pass


class EngineClient(Protocol):
    config: EngineConfig

    @property
    def model_name(self) -> str: ...

    @property
    def tokenizer(self) -> Any | None: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def kv_region(self) -> KVRegion | None:
        """The KV pool as a transport sees it (``--role prefill|decode`` check peers against it)."""
        ...

    @property
    def num_step_failures(self) -> int: ...

    def stalled_for(self) -> float:
        """Seconds without progress while work waits (0 when idle or moving): what /health reads."""
        ...

    def token_ids(self, prompt: Prompt | None = None, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """The ids a request with this prompt or these messages would prefill (validated)."""
        ...

    def add_step_observer(self, observe: Callable[[int], None]) -> None:
        """``observe(num_tokens)`` after every processed batch (called on the engine's thread)."""
        ...

    def remove_step_observer(self, observe: Callable[[int], None]) -> None: ...

    def num_waiting(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def make_request(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                     messages: list[dict[str, Any]] | None = None, request_id: str | None = None,
                     priority: int = 0, tenant: str | None = None) -> Request:
        """Validate and tokenize; raises InvalidRequestError naming the field at fault."""
        ...

    def submit(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Stream a validated request's outputs; leaving the loop early aborts it."""
        ...

    def generate(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                 messages: list[dict[str, Any]] | None = None, request_id: str | None = None,
                 priority: int = 0, tenant: str | None = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def shutdown(self) -> None: ...
