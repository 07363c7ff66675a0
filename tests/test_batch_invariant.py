"""Batch-invariant mode's building blocks on the CPU: fixed-tile GEMMs and the pinned attention plan.

The kernels themselves only differ on the GPU (tests/test_gpu.py checks tokens there); these check
the arithmetic and the plan arrays that make them invariant.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conveyor.model.attention.flashinfer_backend import INVARIANT_QUERY_TILE, pin_query_tile
from conveyor.model.ops import fixed_tile_linear
from conveyor.runtime.build import build_engine
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine.core import EngineCore
from conveyor.runtime.tools.driver import run_until_idle
from conveyor.scheduler import SamplingParams


@pytest.mark.parametrize("bias", [False, True])
def test_fixed_tile_linear_matches_linear_and_ignores_its_batch(bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    row = torch.randn(1, 64, generator=g)
    ref = None
    for rows, at in [(1, 0), (7, 3), (16, 15), (17, 16), (40, 39), (53, 20)]:
        x = torch.randn(rows, 64, generator=g)
        x[at] = row[0]
        out = fixed_tile_linear(x, weight, b, tile=16)
        assert out.shape == (rows, 96)
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        ref = out[at] if ref is None else ref
        assert torch.equal(out[at], ref), f"row changed in a batch of {rows} at {at}"


@pytest.mark.parametrize("seed", range(20))
def test_pin_query_tile_pads_to_the_small_tile_with_empty_requests(seed):
    rng = random.Random(seed)
    page_size, group = 16, rng.choice([1, 2, 4, 8])
    qo_lens = [rng.choice([1, 1, 1, rng.randint(1, 600)]) for _ in range(rng.randint(1, 40))]
    kv_lens_real = [q + rng.randint(0, 300) for q in qo_lens]
    pages = [-(-k // page_size) for k in kv_lens_real]
    qo = torch.tensor([0] + qo_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    kv_indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0).to(torch.int32)
    last = torch.tensor([k - (p - 1) * page_size for k, p in zip(kv_lens_real, pages)], dtype=torch.int32)

    qo2, kv2, last2 = pin_query_tile(qo, kv_indptr, last, group, page_size)
    n = len(qo_lens)
    assert torch.equal(qo2[: n + 1], qo) and torch.equal(kv2[: n + 1], kv_indptr) and torch.equal(last2[:n], last)
    batch = qo2.shape[0] - 1
    assert kv2.shape[0] == batch + 1 and last2.shape[0] == batch
    assert int(qo2[-1]) * group <= INVARIANT_QUERY_TILE * batch  # the planner's mean packed query length
    pad_pages = kv2[n + 1:] - kv2[n:-1]
    assert torch.all(qo2[n + 1:] == qo2[n]) and torch.all(pad_pages == 0)
    # No pages and a "full" last page: FlashInfer reads a KV length of 0 for every padding request.
    assert torch.all((pad_pages - 1) * page_size + last2[n:] == 0)
    if sum(qo_lens) * group <= INVARIANT_QUERY_TILE * n:
        assert batch == n, "no padding when the mean is already small"
    else:
        assert int(qo2[-1]) * group > INVARIANT_QUERY_TILE * (batch - 1), "no more padding than needed"


def test_batch_invariant_flag_reaches_the_kernels(tiny_llama_dir):
    core = build_engine(EngineConfig(model=str(tiny_llama_dir), max_model_len=128, batch_invariant=True,
                                   kv_cache_memory=1 << 22))
    try:
        assert core.executor.worker.model.kernels.linear_tile is not None
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        rng = random.Random(1)
        vocab = core.model_info.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 60))] for _ in range(9)]
        alone = _generate(core, prompts[:1], greedy)
        together = _generate(core, prompts, greedy)
        assert together[0] == alone[0] and all(len(t) == 12 for t in together)
        core.check_integrity()
    finally:
        core.close()


def _generate(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    reqs = [core.inputs.make_request(p, params) for p in prompts]
    run_until_idle(core, reqs)
    return [list(r.output_token_ids) for r in reqs]
