"""The overlap pipeline on the CPU path: depth 1, 2 and 3 must agree token for token.

Every workload runs with the token pool poisoned (-1), so a batch that reads a token nothing
wrote fails on the spot; afterwards the page/slot integrity check must hold.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from conveyor.runtime import EngineConfig, SamplingParams
from conveyor.runtime.build import build_engine
from conveyor.runtime.engine.core import EngineCore
from conveyor.runtime.engine.outputs import RequestOutput
from tests.conftest import kv_bytes_for_pages


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("CONVEYOR_DEBUG_POISON", "1")


def make_core(model_dir, depth: int, pages: int = 14, **kw) -> EngineCore:
    return build_engine(EngineConfig(model=str(model_dir), pipeline_depth=depth, max_model_len=128,
                                   max_num_batched_tokens=48, max_num_seqs=16,
                                   kv_cache_memory=kv_bytes_for_pages(str(model_dir), pages), **kw))


def drive(core: EngineCore, requests: list[tuple[str, list[int], SamplingParams]],
          abort_at: dict[int, list[str]] | None = None) -> dict[str, list[RequestOutput]]:
    """Run to completion, aborting some requests at given steps; check the stream contract as we go."""
    streams: dict[str, list[RequestOutput]] = defaultdict(list)
    for rid, ids, params in requests:
        core.add_request(core.inputs.make_request(ids, params, request_id=rid))
    step = 0
    while core.has_work():
        for rid in (abort_at or {}).get(step, []):
            if (out := core.abort_request(rid)) is not None:
                streams[rid].append(out)
        for out in core.step():
            assert not (streams[out.request_id] and streams[out.request_id][-1].finished), \
                f"{out.request_id}: output after its finish"
            streams[out.request_id].append(out)
        step += 1
        assert step < 5000
    core.check_integrity()
    sched = core.scheduler
    assert sched.kv.num_available_pages == sched.kv.total_pages and not sched.draining
    for rid, _, _ in requests:
        assert sum(o.finished for o in streams[rid]) == 1, f"{rid} finished {sum(o.finished for o in streams[rid])}x"
    return streams


def tokens(stream: list[RequestOutput]) -> list[int]:
    return [t for o in stream for t in o.token_ids]


def workload(model_dir) -> tuple[list, dict[int, list[str]]]:
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.choice([1, 5, 17, 40, 70]))] for _ in range(20)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # A free run tells each request which token to stop on, so stops land mid-sequence and are
    # found one step late at depth > 1.
    free = drive(make_core(model_dir, 1, pages=64), [(str(i), p, greedy) for i, p in enumerate(prompts)])
    reqs = []
    for i, p in enumerate(prompts):
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tokens(free[str(i)])[6]])
        elif kind == 1:
            text = "".join(o.text for o in free[str(i)])
            stop = text[len(text) // 3 : len(text) // 3 + 2]
            params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop] if stop.strip() else [])
        elif kind == 2:
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True)
        else:
            params = greedy
        reqs.append((str(i), p, params))
    reqs.append(("abort-early", prompts[0], greedy))
    reqs.append(("abort-late", prompts[1], greedy))
    return reqs, {2: ["abort-early"], 9: ["abort-late"]}


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_depths_agree_with_late_finishes_aborts_chunking_and_preemption(tiny_chat_dir, batch_invariant):
    reqs, aborts = workload(tiny_chat_dir)
    results = {}
    for depth in (1, 2, 3):
        core = make_core(tiny_chat_dir, depth, batch_invariant=batch_invariant)
        streams = drive(core, reqs, aborts)
        assert core.scheduler.num_preemptions > 0, "the workload must exercise preemption"
        results[depth] = streams
        core.close()
    for rid, _, params in reqs:
        if rid.startswith("abort"):
            assert all(results[d][rid][-1].finish_reason == "abort" for d in (1, 2, 3))
            continue
        ref = results[1][rid]
        for depth in (2, 3):
            got = results[depth][rid]
            assert tokens(got) == tokens(ref), f"{rid} at depth {depth}"
            assert "".join(o.text for o in got) == "".join(o.text for o in ref)
            assert got[-1].finish_reason == ref[-1].finish_reason
    finish = {o[-1].finish_reason for o in results[1].values()}
    assert {"stop", "length", "abort"} <= finish


def test_stop_found_late_drops_the_zombie_token(tiny_chat_dir):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    free = tokens(drive(make_core(tiny_chat_dir, 1), [("a", [5, 6, 7], greedy)])["a"])
    stop_at = free[3]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at])
    for depth in (2, 3):
        core = make_core(tiny_chat_dir, depth)
        out = drive(core, [("a", [5, 6, 7], params)])["a"]
        # Batches after the stop were already launched; their tokens must not reach the stream.
        assert tokens(out) == free[: free.index(stop_at) + 1]
        assert out[-1].finish_reason == "stop" and out[-1].stop_reason == stop_at


def test_stress_2000_requests_at_depth_3(tiny_llama_dir):
    rng = random.Random(0)
    core = build_engine(EngineConfig(model=str(tiny_llama_dir), pipeline_depth=3, max_model_len=96,
                                   max_num_batched_tokens=256, max_num_seqs=64,
                                   kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 120)))
    reqs, aborts = [], defaultdict(list)
    for i in range(2000):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(1, 48))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=rng.randint(1, 40),
                                ignore_eos=True, stop_token_ids=[rng.randrange(3, 512)] if rng.random() < 0.3 else [])
        reqs.append((f"r{i}", prompt, params))
        if rng.random() < 0.2:
            aborts[rng.randint(0, 400)].append(f"r{i}")
    streams = drive(core, reqs, aborts)
    reasons = defaultdict(int)
    for s in streams.values():
        reasons[s[-1].finish_reason] += 1
    assert reasons["abort"] > 0 and reasons["stop"] > 0 and reasons["length"] > 0
    for rid, _, params in reqs:
        n = len(tokens(streams[rid]))
        assert n <= params.max_tokens
        if streams[rid][-1].finish_reason == "length":
            assert n == params.max_tokens
    core.close()
