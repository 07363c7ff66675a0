"""The seam between the engine and the device: what the engine asks of an executor.

The engine schedules, keeps page and slot bookkeeping and turns sampled ids into outputs; it holds
no tensors. An executor owns everything on the device (one worker per GPU rank: model, KV pool,
token pool, pinned staging, graphs, swapper) and runs what the engine scheduled, in launch order.
``CpuExecutor`` and ``CudaExecutor`` (``runtime/worker``) run the model; ``TensorParallelExecutor``
(``runtime/worker/tp_executor.py``) runs it split across ranks; ``SimulatedExecutor``
(``runtime/tools/simulator``) charges a cost model's step time instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from conveyor.memory import SwapOp
from conveyor.scheduler import SamplingParams, ScheduledBatch


class KVLayout(NamedTuple):
    """What the engine's page bookkeeping must know of the device's KV pool."""

    num_pages: int  # pages the engine may hand out
    first_page: int  # the id of the first of them (pages below it are reserved by the device)
    page_bytes: int  # one page across all layers, K and V: what a swapped-out page costs in host memory


class KVCompat(NamedTuple):
    """What two workers must agree on before one writes KV pages into the other's pool."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    layout: str  # the pool's dimension order, e.g. "layer,page,kv,token,head,dim"


class KVRegion(NamedTuple):
    """The KV pool as memory, for a transport (disaggregation): one contiguous region; page ``p``
    of layer ``l`` starts at ``addr + l * layer_stride + p * page_stride`` and is ``page_stride``
    bytes (K and V of its tokens)."""

    addr: int
    nbytes: int
    mem: str  # "DRAM" or "VRAM"
    device_id: int
    num_layers: int
    layer_stride: int
    page_stride: int
    compat: KVCompat


class PromptLogprobRows(NamedTuple):
    """Scored prompt positions of one batch: ``spans`` is (seq index, first position, count) per chunk,
    the lists hold one row per scored position, in span order."""

    spans: list[tuple[int, int, int]]
    logprob: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top_values: list[list[float]]


class BatchResult(NamedTuple):
    token_ids: list[int]  # one sampled id per sampling sequence, in batch order
    logprobs: tuple[list[float], list[list[int]], list[list[float]]] | None  # sampled, top ids, top values
    device_start: float  # host-clock seconds when the device started the batch
    device_end: float  # ... and finished it
    prompt_logprobs: PromptLogprobRows | None = None  # requests that asked for prompt_logprobs or echo


class Executor(Protocol):
    """Batches run in launch order; that order is the only synchronisation between batch N writing
    the token pool and batch N+1 reading it. ``launch`` returns at once with the batch in flight,
    ``wait`` blocks until that batch's sampled ids are on the host."""

    kv_layout: KVLayout
    kv_region: KVRegion | None  # None: the pool cannot be lent to a transport (a simulated executor)

    def prepare(self, batch: ScheduledBatch) -> Any:
        """Stage the batch's inputs (host work only); the result is handed to ``launch``."""
        ...

    def launch(self, prepared: Any) -> Any:
        """Enqueue the batch; the handle keeps alive every buffer the in-flight batch reads."""
        ...

    def wait(self, launched: Any) -> BatchResult: ...

    def fill_grammar_mask(self, launched: Any) -> float | None:
        """Fill a launched batch's structured-output mask from its requests' matchers (which must be
        current: every earlier batch of theirs processed) and release its sampling; the host seconds
        it took, or None if the batch has no mask to fill."""
        ...

    def run_swaps(self, ops: tuple[SwapOp, ...]) -> None:
        """Run KV swap-outs now; called only when nothing is in flight."""
        ...

    def drop_swapped(self) -> None:
        """Forget every host copy of swapped-out KV (a failed step reset the swap bookkeeping)."""
        ...

    def check_sampling_params(self, params: SamplingParams) -> None:
        """Raise for sampling parameters the device's sampler cannot take, so the engine can fail
        one request instead of a whole batch."""
        ...

    def close(self) -> None: ...
