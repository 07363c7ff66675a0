"""Longest-prefix-match admission order: cache-aware, FCFS among equals and on long queues."""

from __future__ import annotations

import random

from conveyor.memory import DynamicReservation, KVCacheManager
from conveyor.runtime import LLM, SamplingParams
from conveyor.scheduler import Request, Scheduler, SchedulerLimits
from conveyor.scheduler import SamplingParams as Params
from conveyor.scheduler.policies import LPMPolicy
from tests.conftest import kv_bytes_for_pages


def req(rid: str, prompt: list[int], t: float) -> Request:
    return Request(rid, prompt, Params(max_tokens=4), 4, arrival_time=t)


def test_longest_cached_prefix_goes_first_and_long_queues_stay_fcfs():
    policy = LPMPolicy(max_queue=3)
    cached = {"a": 0, "b": 3, "c": 3, "d": 1}
    policy.prefix_len = lambda r: cached[r.request_id]
    for i, rid in enumerate("abcd"):
        policy.add(req(rid, [1], float(i)))
    assert policy.peek().request_id == "a"  # 4 waiting > max_queue: arrival order
    assert policy.pop().request_id == "a"
    assert policy.peek().request_id == "b"  # b and c tie: the earlier arrival
    assert policy.pop().request_id == "b"
    assert [policy.pop().request_id for _ in range(2)] == ["c", "d"]


def test_scheduler_binds_lpm_to_the_prefix_cache():
    kv = KVCacheManager(64, 4, DynamicReservation(beta=0.0, adapt=False), enable_prefix_caching=True)
    policy = LPMPolicy()
    s = Scheduler(SchedulerLimits(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64), policy, kv)
    doc = list(range(10, 22))  # 3 pages
    s.add(req("first", doc + [1], 0.0))
    s.schedule()  # prefills "first" and caches its 3 whole pages
    s.add(req("other", [7] * 13, 1.0))
    s.add(req("same-doc", doc + [2], 2.0))
    assert policy.prefix_len(s.requests["same-doc"]) == 3 and policy.prefix_len(s.requests["other"]) == 0
    assert policy.peek().request_id == "same-doc"


def test_lpm_changes_order_not_tokens(tiny_llama_dir):
    rng = random.Random(4)
    docs = [[rng.randrange(3, 500) for _ in range(48)] for _ in range(3)]
    prompts = [docs[rng.randrange(3)] + [rng.randrange(3, 500) for _ in range(5)] for _ in range(12)]
    outs = {}
    for policy in ("fcfs", "lpm"):
        llm = LLM(str(tiny_llama_dir), max_model_len=128, max_num_seqs=2, schedule_policy=policy,
                  kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 24))
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        outs[policy] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.core.check_integrity()
        llm.close()
    assert outs["lpm"] == outs["fcfs"]
