"""A tensor-parallel rank's model runner: rank 0 samples and broadcasts the ids; the other ranks
take them into their token pools.

Why rank 0 samples (rather than every rank sampling the same all-gathered logits): the sampling
inputs that are host results stay on rank 0. A structured-output mask is filled from the
engine's matchers only after the previous batch is read back, and penalties, logit bias and seeds
come from the requests; shipping them would make the other ranks wait on a host result, or need
bit-identical samplers on every rank. The broadcast is one [S] int64 collective per step on the
compute stream, next to the two all-reduces per layer and the logits all-gather a step has anyway.
"""

from __future__ import annotations

import os
import zlib

import torch

from conveyor.model.parallel import TensorParallel
from conveyor.model.sampling import SamplerOutput
from conveyor.runtime.worker.model_runner import ModelRunner, PreparedBatch


class RankDisagreement(AssertionError):
    """Ranks of one tensor-parallel group hold different sampled ids or logits (CONVEYOR_DEBUG_CHECKS=1)."""


class ParallelModelRunner(ModelRunner):
    def __init__(self, *args: object, tp: TensorParallel, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tp = tp
        self.debug_checks = os.environ.get("CONVEYOR_DEBUG_CHECKS") == "1"

    @torch.inference_mode()
    def sample(self, prepared: PreparedBatch, logits: torch.Tensor | None) -> SamplerOutput:
        """Rank 0: sample as a single device would, then send the ids to the other ranks."""
        greedy = logits.argmax(-1) if self.debug_checks and logits is not None else None  # before any in-place mask
        out = super().sample(prepared, logits)
        if logits is not None:
            self.tp.broadcast(out.token_ids)
            self._check(prepared, greedy, out.token_ids)
        return out

    @torch.inference_mode()
    def follow(self, prepared: PreparedBatch, logits: torch.Tensor | None) -> None:
        """Ranks 1..N-1: receive the ids rank 0 sampled and write them where rank 0 wrote its own."""
        if logits is None:
            return
        ids = torch.empty(prepared.sample_slots.shape[0], dtype=torch.int64, device=self.device)
        self.tp.broadcast(ids)
        self.token_pool.scatter(prepared.sample_slots, prepared.sample_positions, ids)
        self._check(prepared, logits.argmax(-1) if self.debug_checks else None, ids)

    def _check(self, prepared: PreparedBatch, greedy: torch.Tensor | None, ids: torch.Tensor) -> None:
        """Debug mode: every rank holds the same sampled ids and the same gathered logits' argmax."""
        if greedy is None:
            return
        digest = zlib.crc32(ids.cpu().numpy().tobytes() + greedy.cpu().numpy().tobytes())
        if not self.tp.all_equal(digest, self.device):
            raise RankDisagreement(f"tensor-parallel ranks disagree on step {prepared.batch.step_id}'s sampled ids "
                                   f"(rank {self.tp.rank} holds {ids.tolist()})")
