"""Prefill/decode disaggregation's state machine on the loopback transport: token equality with the
colocated engine, every failure by fault injection, integrity after every step, nothing leaked."""

from __future__ import annotations

import random

import pytest

from conveyor.runtime.disagg import decode as decode_mod
from conveyor.runtime.disagg import prefill as prefill_mod
from conveyor.runtime.disagg.decode import FAILURE, ChannelEvent
from conveyor.scheduler import RequestStatus
from tests.pd_harness import P_URL, PDPair, colocated_tokens, make_core

PS = 16


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture
def pair(tiny_llama_dir):
    p = PDPair(tiny_llama_dir, p_overrides=dict(max_num_batched_tokens=32))
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    core = make_core(tiny_llama_dir)
    yield core
    core.close()


def _settle(pair: PDPair) -> None:
    pair.run_until(lambda: pair.idle(pair.p) and pair.idle(pair.d))


def test_tokens_equal_colocated_short_page_chunked_and_prefix_hit(pair, reference):
    prompts = {"short": _prompt(5, 1), "page": _prompt(PS, 2), "chunked": _prompt(100, 3)}
    shared = _prompt(48, 4)
    prompts["hit"] = shared + _prompt(7, 5)
    want = colocated_tokens(reference, prompts)
    for rid in ("short", "page", "chunked"):
        pair.submit(rid, prompts[rid])
    pair.submit("warm", shared + _prompt(9, 6))  # puts the shared prefix in D's cache
    pair.run_until(lambda: all(pair.finished(r) for r in ("short", "page", "chunked", "warm")))
    pair.submit("hit", prompts["hit"])
    pair.run_until(lambda: pair.finished("hit") is not None)
    for rid in prompts:
        assert pair.tokens(rid) == want[rid], rid
        assert pair.finished(rid).finish_reason == "length"
    assert pair.finished("hit").num_cached_tokens == 48  # D's cache served 3 pages: P was not asked for them
    assert pair.d.disagg.stats.results["ok"] == 5
    _settle(pair)


def test_prefix_hit_on_d_sends_only_the_tail(pair):
    shared = _prompt(48, 7)
    pair.submit("a", shared + [7, 8, 9])
    pair.run_until(lambda: pair.finished("a") is not None)
    sent_before = pair.fabric.bytes_written
    pair.submit("b", shared + [10, 11])
    pair.step()  # D admits and announces
    ready = pair.channel.history[-1]
    assert ready.first_page == 3 and len(ready.pages) == 1
    pair.run_until(lambda: pair.finished("b") is not None)
    page_all_layers = pair.d.executor.kv_region.page_stride * pair.d.executor.kv_region.num_layers
    assert pair.fabric.bytes_written - sent_before == page_all_layers
    _settle(pair)


def test_abort_while_queued_on_d_never_reaches_p(tiny_llama_dir):
    pair = PDPair(tiny_llama_dir, d_overrides=dict(max_num_seqs=1))
    try:
        pair.fabric.faults.delay_s = 0.3  # the first room holds D's only slot a while
        pair.submit("first", _prompt(20, 8), room="r1")
        pair.submit("queued", _prompt(20, 9), room="r2")
        pair.run_until(lambda: "r1" in pair.p_rooms)
        assert pair.d.scheduler.requests["queued"].status is RequestStatus.WAITING
        assert pair.abort("queued").finish_reason == "abort"
        pair.run_until(lambda: pair.finished("first") is not None)
        _settle(pair)
        assert pair.channel.num_ready == 1  # P never heard of "queued"
        assert pair.finished("first").finish_reason == "length"
    finally:
        pair.close()


def test_abort_while_awaiting_kv_before_p_started(pair):
    pair.submit("a", _prompt(40, 10))
    pair.d.step()  # admitted and announced; P has not seen it yet
    assert pair.d.scheduler.awaiting
    assert pair.d.scheduler.kv.page_counts()["receiving"] == 3
    out = pair.abort("a")
    assert out is not None and out.finish_reason == "abort"
    assert pair.d.scheduler.kv.page_counts()["quarantined"] == 3  # P may still write: not free yet
    _settle(pair)
    assert pair.p.disagg.stats.results["aborted"] == 1


def test_abort_while_prefilling_on_p(pair):
    pair.submit("a", _prompt(200, 11))  # 7 chunks of 32 on P
    pair.run_until(lambda: pair.p.scheduler.running and pair.p.scheduler.running[0].num_computed_tokens >= 64)
    pair.abort("a")
    _settle(pair)
    assert pair.finished("a").finish_reason == "abort"
    assert pair.p.disagg.stats.results["aborted"] == 1


def test_abort_while_sending(pair):
    pair.fabric.faults.delay_s = 0.3
    pair.submit("a", _prompt(100, 12))
    pair.run_until(lambda: pair.p.scheduler.kv.page_counts()["sending"] > 0)
    pair.abort("a")
    assert pair.d.scheduler.kv.page_counts()["quarantined"] > 0
    _settle(pair)
    assert pair.finished("a").finish_reason == "abort"


def test_d_rejects_before_admission(pair):
    from conveyor.scheduler import InvalidRequestError, SamplingParams

    with pytest.raises(InvalidRequestError):
        pair.d.inputs.make_request(_prompt(2000, 13), SamplingParams(max_tokens=4), "too-long")
    pair.step()
    assert pair.channel.num_ready == 0 and not pair.p.has_work()


def test_lease_expiry_fails_with_error_and_frees(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(decode_mod, "QUARANTINE_GRACE_S", 0.2)
    monkeypatch.setattr(prefill_mod, "SETTLE_GRACE_S", 0.2)
    pair = PDPair(tiny_llama_dir, lease_s=0.5)
    pair.d.disagg.post_timeout_s = 0.1
    try:
        pair.fabric.faults.drop = True  # WRITEs never land: only the lease ends it
        pair.submit("a", _prompt(40, 14))
        pair.run_until(lambda: pair.finished("a") is not None)
        out = pair.finished("a")
        assert out.finish_reason == "error" and out.error.startswith(FAILURE)
        _settle(pair)
        assert pair.d.disagg.stats.results["expired"] == 1
    finally:
        pair.close()


def test_write_error_aborts_the_room_on_both_sides(pair):
    pair.fabric.faults.error = True
    pair.submit("a", _prompt(40, 15))
    pair.run_until(lambda: pair.finished("a") is not None)
    assert pair.finished("a").finish_reason == "error"
    _settle(pair)
    assert pair.p.disagg.stats.results["error"] == 1


def test_p_dies_mid_transfer(pair):
    pair.fabric.faults.delay_s = 0.3
    pair.submit("a", _prompt(100, 16))
    pair.submit("b", _prompt(30, 17))
    pair.run_until(lambda: pair.p.scheduler.kv.page_counts()["sending"] > 0)
    pair.p_dead = True
    pair.fabric.kill("P")
    pair.channel.pending.append(ChannelEvent("peer_dead", url=P_URL))  # what the liveness check reports
    pair.step()
    for rid in ("a", "b"):
        out = pair.finished(rid)
        assert out is not None and out.finish_reason == "error" and "gone" in out.error
    assert pair.idle(pair.d)  # freed at once: a dead process writes nothing


def test_d_dies_mid_transfer(pair):
    pair.fabric.faults.delay_s = 0.2
    pair.submit("a", _prompt(100, 18))
    pair.run_until(lambda: pair.p.scheduler.kv.page_counts()["sending"] > 0)
    pair.d_dead = True
    pair.fabric.kill("D")
    pair.run_until(lambda: pair.idle(pair.p), timeout_s=10)
    assert pair.p.disagg.stats.results["error"] == 1


def test_survivors_keep_their_tokens_under_random_aborts(pair, reference):
    rng = random.Random(0)
    prompts = {f"r{i}": _prompt(rng.randrange(3, 90), 100 + i) for i in range(24)}
    want = colocated_tokens(reference, prompts)
    pair.fabric.faults.delay_s = 0.01
    for rid, prompt in prompts.items():
        pair.submit(rid, prompt)
    doomed = set(rng.sample(sorted(prompts), 8))
    steps = 0
    while not all(pair.finished(r) for r in prompts):
        pair.step()
        steps += 1
        for rid in list(doomed):
            if rng.random() < 0.1:
                pair.abort(rid)
                doomed.discard(rid)
        assert steps < 5000
    for rid in prompts:
        out = pair.finished(rid)
        if out.finish_reason in ("length", "stop"):
            assert pair.tokens(rid) == want[rid], (rid, out.finish_reason)
        else:
            assert out.finish_reason == "abort"
            assert pair.tokens(rid) == want[rid][:len(pair.tokens(rid))]
    _settle(pair)


def test_a_decode_request_preempted_after_its_kv_arrived_recomputes_on_d(pair, reference):
    """Once P's KV is in, the request is D's own: a preemption (memory pressure) recomputes it on D, with
    the colocated tokens, instead of announcing its room to P a second time."""
    prompts = {"a": _prompt(40, 11)}
    want = colocated_tokens(reference, prompts, max_tokens=12)
    pair.submit("a", prompts["a"], max_tokens=12)
    req = pair.d.scheduler.requests["a"]
    pair.run_until(lambda: req.status is RequestStatus.RUNNING and len(req.output_token_ids) >= 3)
    assert req.remote_prefill is None
    pair.d.scheduler.requeue(req)  # what a retraction does
    pair.run_until(lambda: pair.finished("a") is not None)
    assert pair.tokens("a") == want["a"] and pair.finished("a").finish_reason == "length"
    assert pair.channel.num_ready == 1 and req.num_preemptions == 1
    _settle(pair)
