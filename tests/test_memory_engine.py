"""KV memory policies on the real CPU engine: they may change when and where KV lives, never a token.

Each workload runs with the token pool poisoned and the integrity check after every step.
"""

from __future__ import annotations

import random

import pytest

from conveyor.runtime import LLM, SamplingParams
from tests.conftest import kv_bytes_for_pages


@pytest.fixture(autouse=True)
def debug_modes(monkeypatch):
    monkeypatch.setenv("CONVEYOR_DEBUG_POISON", "1")
    monkeypatch.setenv("CONVEYOR_DEBUG_CHECKS", "1")


def run(model_dir, prompts, max_tokens, pages: int, **config):
    llm = LLM(str(model_dir), max_model_len=128, max_num_batched_tokens=64, max_num_seqs=8,
              kv_cache_memory=kv_bytes_for_pages(str(model_dir), pages), **config)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.core.check_integrity()
    stats = llm.core.stats()
    kv = llm.core.scheduler.kv
    assert kv.num_available_pages == kv.total_pages, "pages leaked"
    assert kv.prefix_cache is None or kv.prefix_cache.num_locked_pages == 0, "a lock outlived its request"
    llm.close()
    return [o.token_ids for o in outs], stats, kv


def rag_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Three shared 'documents' (40-70 tokens) and a short question each: the RAG shape."""
    rng = random.Random(seed)
    docs = [[rng.randrange(3, 500) for _ in range(rng.randint(40, 70))] for _ in range(3)]
    return [docs[i % 3] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 12))] for i in range(n)]


def test_prefix_caching_changes_no_token_and_skips_shared_prefills(tiny_llama_dir):
    prompts = rag_prompts(18)
    # 24 pages of 16 tokens for 8 running requests of up to ~100 tokens: the cache must evict.
    off, stats_off, _ = run(tiny_llama_dir, prompts, 16, pages=24, enable_prefix_caching=False)
    on, stats_on, kv = run(tiny_llama_dir, prompts, 16, pages=24, enable_prefix_caching=True)
    assert on == off
    assert stats_off.prefix_hit_tokens == 0 and stats_off.kv_pages_cached == 0
    assert stats_on.prefix_hit_tokens >= 12 * 32  # later askers of each document skip >= 2 of its pages
    assert stats_on.prefill_tokens + stats_on.prefix_hit_tokens >= sum(map(len, prompts))
    assert stats_on.prefill_tokens < stats_off.prefill_tokens
    assert kv.num_evicted_pages > 0


def test_a_repeated_prompt_recomputes_only_its_last_partial_page(tiny_llama_dir):
    prompt = list(range(5, 45))  # 2 whole pages + 8 tokens
    first, _, _ = run(tiny_llama_dir, [prompt], 8, pages=16)
    llm = LLM(str(tiny_llama_dir), max_model_len=256, kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 16))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = llm.generate([prompt], params, use_tqdm=False)[0]
    b = llm.generate([prompt], params, use_tqdm=False)[0]
    assert a.token_ids == b.token_ids == first[0]
    assert b.num_cached_tokens == 32 and a.num_cached_tokens == 0
    llm.close()


def test_dynamic_reservation_retracts_safely_and_raises_beta(tiny_llama_dir):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(8, 40))] for _ in range(16)]
    # 14 pages: conservative admits about two at a time; dynamic (beta 0.05) admits all eight slots
    # and must retract when their outputs grow.
    cons, s_cons, _ = run(tiny_llama_dir, prompts, 48, pages=14, reservation="conservative",
                          enable_prefix_caching=False)
    dyn, s_dyn, kv = run(tiny_llama_dir, prompts, 48, pages=14, reservation="dynamic", reservation_beta=0.05,
                         enable_prefix_caching=False)
    assert dyn == cons
    assert s_cons.num_retractions == 0
    assert s_dyn.num_retractions > 0 and kv.reservation.beta > 0.05


def test_swap_preemption_restores_kv_instead_of_recomputing(tiny_llama_dir):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(20, 60))] for _ in range(12)]
    base, s_base, _ = run(tiny_llama_dir, prompts, 40, pages=16, reservation_beta=0.05, enable_prefix_caching=False)
    swap, s_swap, _ = run(tiny_llama_dir, prompts, 40, pages=16, reservation_beta=0.05, enable_prefix_caching=False,
                          preemption_mode="swap")
    assert swap == base
    assert s_swap.num_retractions > 0 and s_swap.num_swapped_out > 0
    assert s_swap.num_swapped_in == s_swap.num_swapped_out
    assert s_swap.prefix_hit_tokens == 0  # restored KV is not a prefix-cache hit
    # Swapped requests resume where they were: fewer tokens are computed twice.
    assert s_swap.prefill_tokens < s_base.prefill_tokens


def test_same_prompt_admitted_together_is_prefilled_once(tiny_llama_dir):
    """n > 1 (or a burst on one document): the copies wait one step and read the first one's pages."""
    prompt = list(range(7, 7 + 50))  # 3 whole pages + 2 tokens
    outs, stats, _ = run(tiny_llama_dir, [prompt] * 4, 8, pages=32)
    assert all(o == outs[0] for o in outs)
    assert stats.prefix_hit_tokens == 3 * 48
    assert stats.prefill_tokens == 50 + 3 * 2


def test_aborting_a_swapped_out_request_frees_its_host_copy(tiny_llama_dir):
    from conveyor.runtime import EngineConfig
    from conveyor.runtime.build import build_engine

    core = build_engine(EngineConfig(model=str(tiny_llama_dir), max_model_len=128, max_num_batched_tokens=64,
                                   max_num_seqs=8, kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 16),
                                   reservation_beta=0.05, reservation_adapt=False, enable_prefix_caching=False,
                                   preemption_mode="swap"))
    rng = random.Random(2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(12):
        core.add_request(core.inputs.make_request([rng.randrange(3, 500) for _ in range(rng.randint(20, 60))],
                                                  params, request_id=f"r{i}"))
    swapped = None
    for _ in range(500):
        core.step()
        swapped = next((r for r in core.scheduler.requests.values() if r.swapped), None)
        if swapped is not None:
            break
    assert swapped is not None, "the workload must swap a request out"
    for rid in list(core.scheduler.requests):  # nothing runs after this: the drop cannot ride on a batch
        core.abort_request(rid)
    while core.has_work():
        core.step()
    core.step()  # idle: pending host-buffer drops run now, not at the next batch
    core.check_integrity()
    assert core.scheduler.swap.num_used_pages == 0 and core.executor.worker.runner.swapper.host == {}
    core.close()
