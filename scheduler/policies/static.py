"""Static batching (the pre-continuous-batching baseline): fixed batches that run to the end.

A batch of up to ``batch_size`` requests forms when that many wait, or when the oldest has
waited ``timeout_s``. Its members are admitted together and nothing else is admitted until
the last of them finishes, i.e. the batch runs until its longest output ends.

A static engine would also pad every prompt to the batch's longest and keep finished rows
computing until the longest output ends. Conveyor does not compute padding (outputs must not
depend on the policy); this policy counts the tokens a padded static batcher would waste, so
the baseline's cost can be reported: ``padding_waste`` is the wasted share of all token slots.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from conveyor.scheduler.policies.base import SchedulingPolicy
from conveyor.scheduler.request import Request

Clock = Callable[[], float]


class StaticBatchPolicy(SchedulingPolicy):
    name = "static"

    def __init__(self, batch_size: int = 8, timeout_s: float = 0.5, clock: Clock = time.monotonic) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.clock = clock
        self._queue: deque[Request] = deque()  # not yet in a batch
        self._to_admit: deque[Request] = deque()  # in the current batch, not (or no longer) running
        self._batch: list[Request] = []  # the current batch, all members
        self._unfinished: set[str] = set()
        self.num_batches = 0
        self.padding_tokens = 0
        self.useful_tokens = 0

    @property
    def padding_waste(self) -> float:
        total = self.padding_tokens + self.useful_tokens
        return self.padding_tokens / total if total else 0.0

    def _maybe_form_batch(self) -> None:
        if self._batch or not self._queue:
            return
        full = len(self._queue) >= self.batch_size
        if not full and self.clock() - self._queue[0].arrival_time < self.timeout_s:
            return
        for _ in range(min(self.batch_size, len(self._queue))):
            r = self._queue.popleft()
            self._batch.append(r)
            self._to_admit.append(r)
            self._unfinished.add(r.request_id)
        self.num_batches += 1

    def _close_batch(self) -> None:
        """Count what padding to the longest prompt and the longest output would have cost."""
        prompts = [r.num_prompt_tokens for r in self._batch]
        outputs = [len(r.output_token_ids) for r in self._batch]
        useful = sum(prompts) + sum(outputs)
        self.useful_tokens += useful
        self.padding_tokens += len(self._batch) * (max(prompts) + max(outputs)) - useful
        self._batch = []

    # -- the waiting queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._to_admit.appendleft(request)  # still a member of its batch

    def remove(self, request: Request) -> None:
        if request in self._to_admit:
            self._to_admit.remove(request)
        else:
            self._queue.remove(request)

    def peek(self) -> Request | None:
        self._maybe_form_batch()
        return self._to_admit[0] if self._to_admit else None

    def pop(self) -> Request:
        head = self.peek()
        assert head is not None, "nothing admissible"
        return self._to_admit.popleft()

    def num_waiting(self) -> int:
        return len(self._queue) + len(self._to_admit)

    def waiting(self) -> Iterator[Request]:
        return iter([*self._to_admit, *self._queue])

    # -- running --------------------------------------------------------------------------
    def order_running(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=lambda r: r.arrival_time)

    def victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: r.arrival_time)

    def preempt_for_waiting(self, running: list[Request]) -> list[Request]:
        return []

    def on_finish(self, request: Request) -> None:
        if request.request_id in self._unfinished:
            self._unfinished.discard(request.request_id)
            if not self._unfinished:
                self._close_batch()

    def metrics(self) -> dict[str, float]:
        return {"static_padding_waste": self.padding_waste, "static_batches": self.num_batches}
