"""A simulated device for the real engine: each batch costs the cost model's step time on a simulated
clock, and the "model" samples EOS once a request reaches the output length its workload drew."""

from __future__ import annotations

from collections.abc import Mapping

from conveyor.memory import SwapOp
from conveyor.runtime.engine.executor import BatchResult, KVLayout
from conveyor.runtime.tools.simulator.cost_model import CostModel
from conveyor.scheduler import SamplingParams, ScheduledBatch, ScheduledSeq

SIM_EOS = 1  # the simulated model's EOS id; every other sample is id 0


class SimClock:
    """Simulated seconds: callable as a clock, and ``sleep`` lets time pass at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class SimulatedExecutor:
    """Runs a batch by advancing the clock; at depth 1 the batch is done when ``launch`` returns.

    A request whose drawn length is below its max_tokens ends with EOS (reason stop), as a real model's
    answer ends; one that runs to max_tokens ends by length. Policies never see the drawn lengths.
    """

    def __init__(self, cost: CostModel, clock: SimClock, lengths: Mapping[str, int], num_pages: int) -> None:
        self.cost = cost
        self.clock = clock
        self.lengths = lengths
        self.kv_layout = KVLayout(num_pages=num_pages, first_page=1, page_bytes=1)
        self.kv_region = None  # nothing to transfer: no role but "both"

    def prepare(self, batch: ScheduledBatch) -> ScheduledBatch:
        return batch

    def launch(self, batch: ScheduledBatch) -> BatchResult:
        start = self.clock.now
        kv_read = sum(q.kv_len for q in batch.seqs)  # as StepRecord counts it
        self.clock.now += self.cost.step_s(batch.num_tokens, kv_read, prefill=batch.num_prefill_tokens > 0)
        return BatchResult([self._sample(s) for s in batch.seqs if s.samples], None, start, self.clock.now)

    def _sample(self, seq: ScheduledSeq) -> int:
        drawn = self.lengths[seq.request.request_id]
        ends_here = seq.sample_index + 1 >= drawn
        return SIM_EOS if ends_here and drawn < seq.request.max_new_tokens else 0

    def wait(self, launched: BatchResult) -> BatchResult:
        return launched

    def fill_grammar_mask(self, launched: BatchResult) -> None:
        return None  # simulated requests carry no grammar

    def drop_swapped(self) -> None:
        pass

    def check_sampling_params(self, params: SamplingParams) -> None:
        pass  # the simulated sampler takes anything

    def run_swaps(self, ops: tuple[SwapOp, ...]) -> None:
        raise AssertionError("the simulator recomputes preempted requests; it never swaps")

    def close(self) -> None:
        pass
