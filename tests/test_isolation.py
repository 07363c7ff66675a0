"""One bad request fails alone: the engine blames, fails and frees per request, and never leaks a page.

Requests are made bad behind the input stage's back (a parameter changed after validation, a
detokenizer that raises), because that stage refuses them otherwise; what is tested is the
engine's own guard. Every test ends with the integrity check and every page back in the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from conveyor.runtime import AsyncEngine, EngineConfig, SamplingParams
from conveyor.runtime.async_engine import EngineDeadError
from conveyor.runtime.engine.core import MAX_CONSECUTIVE_FAILURES
from conveyor.runtime.engine.outputs import RequestOutput

pytestmark = pytest.mark.asyncio(loop_scope="module")

OVERFLOW = 2**63  # a top_k that passes a type check and overflows the sampler's int64 tensor


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_chat_dir) -> AsyncIterator[AsyncEngine]:
    # Batch-invariant: an innocent request recomputed after a failed batch must give the same tokens.
    eng = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=512, batch_invariant=True,
                                                kv_cache_memory=4 << 20))
    yield eng
    await eng.shutdown()


async def wait_clean(eng: AsyncEngine, timeout: float = 20.0) -> None:
    """Bounded poll until the engine holds no request and every page is free; then the integrity check."""
    sched = eng.core.scheduler
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sched.requests or sched.kv.num_available_pages != sched.kv.total_pages:
        assert loop.time() < deadline, (f"not idle: {len(sched.requests)} requests, "
                                        f"{sched.kv.num_available_pages}/{sched.kv.total_pages} pages available")
        await asyncio.sleep(0.005)
    await eng.wait_idle()
    sched.check_integrity()
    assert not sched.running and not sched.draining and sched.num_waiting == 0


async def run(eng: AsyncEngine, req: Any) -> list[RequestOutput]:
    return [o async for o in eng.submit(req)]


def innocent(eng: AsyncEngine, i: int, max_tokens: int = 24) -> Any:
    return eng.make_request(f"innocent request number {i}", SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                            ignore_eos=True))


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def reference(eng: AsyncEngine, n: int) -> list[list[int]]:
    return [tokens(await run(eng, innocent(eng, i))) for i in range(n)]


async def test_overflowing_top_k_fails_alone_at_admission(engine: AsyncEngine) -> None:
    expected = await reference(engine, 3)
    bad = engine.make_request("bad", SamplingParams(max_tokens=8))
    bad.params.top_k = OVERFLOW  # past validation, as the 2**63 once got past a -1 check
    results = await asyncio.gather(*(run(engine, innocent(engine, i)) for i in range(3)), run(engine, bad))
    *good, failed = results
    assert failed[-1].finish_reason == "error" and "invalid request" in failed[-1].error
    assert [tokens(g) for g in good] == expected
    assert all(g[-1].finish_reason == "length" for g in good)
    await wait_clean(engine)


async def test_a_request_poisoned_mid_run_fails_alone_and_its_batch_recomputes(engine: AsyncEngine) -> None:
    expected = await reference(engine, 3)
    victim = engine.make_request("victim", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    seen: list[RequestOutput] = []

    async def poisoned() -> list[RequestOutput]:
        async for out in engine.submit(victim):
            seen.append(out)
            if len(seen) == 2:
                victim.params.top_k = OVERFLOW  # the next batch's sampling tensors overflow
        return seen

    with capture_logs() as logs:
        results = await asyncio.gather(*(run(engine, innocent(engine, i)) for i in range(3)), poisoned())
    *good, failed = results
    assert failed[-1].finish_reason == "error" and "invalid sampling parameters" in failed[-1].error
    assert [tokens(g) for g in good] == expected  # recomputed, not failed, and the same tokens
    assert all(g[-1].finish_reason == "length" for g in good)
    lines = [e for e in logs if e["event"] == "engine step failed"]
    assert lines and all(line["blamed"] == [victim.request_id] for line in lines)
    assert engine.is_alive
    await wait_clean(engine)


async def test_a_detokenizer_error_fails_only_its_request(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = await reference(engine, 2)
    victim = engine.make_request("victim", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    outputs = engine.core.outputs
    real_track = outputs.track

    def track(req: Any) -> None:
        real_track(req)
        if req is victim:
            def boom(token_id: int) -> str | None:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            outputs._detok[req.request_id].add = boom  # type: ignore[method-assign]

    monkeypatch.setattr(outputs, "track", track)
    *good, failed = await asyncio.gather(*(run(engine, innocent(engine, i)) for i in range(2)), run(engine, victim))
    assert failed[-1].finish_reason == "error" and "output processing failed" in failed[-1].error
    assert [tokens(g) for g in good] == expected
    await wait_clean(engine)


async def test_a_failure_nobody_is_blamed_for_fails_its_batch_and_frees_its_pages(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = engine.core.executor.runner
    real_prepare = runner.prepare
    fail = [True]

    def prepare(batch: Any) -> Any:
        if fail and any(s.request.num_launched_outputs >= 3 for s in batch.seqs):
            fail.pop()
            raise RuntimeError("injected device failure")
        return real_prepare(batch)

    monkeypatch.setattr(runner, "prepare", prepare)
    results = await asyncio.gather(*(run(engine, innocent(engine, i, 40)) for i in range(3)))
    assert all(r[-1].finish_reason == "error" and "injected device failure" in r[-1].error for r in results)
    await wait_clean(engine)
    # ... and it recovered: the next requests are served.
    assert all(r[-1].finish_reason == "length" for r in await asyncio.gather(
        *(run(engine, innocent(engine, i)) for i in range(2))))
    await wait_clean(engine)


async def test_steps_that_keep_failing_kill_the_engine_instead_of_spinning(tiny_chat_dir: Any) -> None:
    eng = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=256))
    try:
        def broken(batch: Any) -> Any:
            raise RuntimeError("device lost")

        eng.core.executor.runner.prepare = broken  # type: ignore[method-assign]
        for i in range(MAX_CONSECUTIVE_FAILURES - 1):  # each fails its request, the engine carries on
            outs = await run(eng, innocent(eng, i))
            assert outs[-1].finish_reason == "error" and eng.is_alive
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(run(eng, innocent(eng, 9)), 30)
        await asyncio.wait_for(asyncio.to_thread(eng._thread.join), 30)  # it says so, then it exits
        assert not eng.is_alive
    finally:
        await eng.shutdown()


async def test_many_poisoned_requests_in_a_row_leak_no_page(engine: AsyncEngine) -> None:
    """The issue's pool ran full after ~22 failed requests; a blamed failure must free everything."""
    for i in range(30):
        victim = engine.make_request(f"victim {i} " * 20, SamplingParams(temperature=0, max_tokens=100,
                                                                           ignore_eos=True))
        outs: list[RequestOutput] = []
        async for out in engine.submit(victim):
            outs.append(out)
            if len(outs) == 1:
                victim.params.top_k = OVERFLOW
        assert outs[-1].finish_reason == "error"
    assert engine.is_alive  # blamed failures do not count towards giving up
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    await wait_clean(engine)
