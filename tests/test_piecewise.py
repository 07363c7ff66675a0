"""Piecewise graphs' logic on the CPU: the same pieces, run eagerly on the padded fixed buffers
(``capture=False``), must give what the plain forward gives. tests/test_gpu.py replays real graphs."""

from __future__ import annotations

import random

import pytest
import torch

from conveyor.runtime.build import build_engine
from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.core import EngineCore
from conveyor.runtime.tools.driver import run_until_idle
from conveyor.runtime.worker.piecewise_graphs import PiecewiseGraphs, capture_token_sizes
from conveyor.scheduler import SamplingParams


def test_capture_token_sizes_cover_every_count_up_to_the_limit():
    assert capture_token_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert capture_token_sizes(300) == [16, 32, 64, 128, 256, 300]
    assert capture_token_sizes(8) == [8]
    with pytest.raises(ConfigError, match="max_piecewise_tokens"):
        EngineConfig(max_piecewise_tokens=-1)


class CountingPieces(PiecewiseGraphs):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes_run: list[tuple[int, int]] = []

    def run(self, size, num_tokens, *args):
        self.sizes_run.append((size, num_tokens))
        return super().run(size, num_tokens, *args)


def _engine(model_dir, batch_invariant: bool, pieces: int, depth: int = 2) -> tuple[EngineCore, CountingPieces | None]:
    core = build_engine(EngineConfig(model=str(model_dir), max_model_len=256, max_num_batched_tokens=96,
                                   kv_cache_memory=1 << 22, batch_invariant=batch_invariant, pipeline_depth=depth))
    counting = None
    if pieces:
        counting = CountingPieces(core.executor.worker.model, core.executor.worker.kv_pool, core.executor.worker.token_pool, core.executor.worker.runner.staging, pieces,
                                  capture=False)
        core.executor.worker.runner.pieces = counting
    return core, counting


def _generate(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    reqs = [core.inputs.make_request(p, params) for p in prompts]
    run_until_idle(core, reqs)
    core.check_integrity()
    return [list(r.output_token_ids) for r in reqs]


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_pieces_give_the_plain_forwards_tokens(model, request):
    """Chunked prefills (96-token budget), mixed steps and prefix hits, through the pieces at sizes
    16..64 (steps over 64 tokens run eagerly): the same greedy tokens as the plain forward. Batch-
    invariant GEMMs, so padding rows cannot change a real row's bits and equality is exact."""
    model_dir = request.getfixturevalue(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 150))] for _ in range(12)]
    prompts.append(prompts[0][:40] + [7, 8, 9])  # a prefix hit
    runs = {}
    for pieces in (0, 64):
        core, counting = _engine(model_dir, batch_invariant=True, pieces=pieces)
        try:
            runs[pieces] = _generate(core, prompts)
        finally:
            core.close()
        if counting is not None:
            sizes = {s for s, _ in counting.sizes_run}
            assert {16, 32, 64} & sizes and all(t <= s for s, t in counting.sizes_run)
            assert any(t < s for s, t in counting.sizes_run), "no step was padded"
    assert runs[64] == runs[0]
    assert all(len(t) == 10 for t in runs[0])


def test_padded_rows_leave_real_rows_alone(tiny_qwen3_dir):
    """One mixed batch run both ways without batch invariance: the real rows' hidden states agree to
    float32 rounding, the padded rows never reach the KV cache."""
    core, counting = _engine(tiny_qwen3_dir, batch_invariant=False, pieces=64, depth=1)  # nothing left in flight
    try:
        assert counting is not None
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for p in ([5, 6, 7], list(range(10, 30))):
            core.add_request(core.inputs.make_request(p, params))
        core.step()
        core.step()  # the first request decodes (or both) while nothing new arrives
        core.add_request(core.inputs.make_request(list(range(40, 57)), params))
        batch = core.scheduler.schedule()
        assert batch is not None and 0 < batch.num_decodes < len(batch.seqs)
        runner = core.executor.worker.runner
        prepared = runner.prepare(batch)
        assert prepared.piece_size == 32 and prepared.token_slots.shape[0] == 32
        t = batch.num_tokens
        kv_before = core.executor.worker.kv_pool.data.clone()
        runner.backend.plan(prepared.meta)
        pieces = runner.pieces.run(32, t, runner.backend, prepared.meta, prepared.token_slots, prepared.positions)
        kv_pieces = core.executor.worker.kv_pool.data.clone()
        core.executor.worker.kv_pool.data.copy_(kv_before)
        ids = core.executor.worker.token_pool.gather(prepared.token_slots[:t], prepared.positions[:t])
        plain = core.executor.worker.model(ids, prepared.positions[:t], core.executor.worker.kv_pool.data, runner.backend, prepared.meta)
        torch.testing.assert_close(pieces[:t], plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv_pieces, core.executor.worker.kv_pool.data, rtol=1e-5, atol=1e-5)
    finally:
        core.close()
