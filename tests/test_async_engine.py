"""The embedded async API: streaming, abort, bad input, and no page ever leaks."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.model import ModelNotFoundError, WeightsError
from conveyor.runtime import AsyncEngine, EngineConfig, SamplingParams
from conveyor.scheduler import InvalidRequestError


@pytest.fixture
async def engine(tiny_chat_dir):
    eng = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=256))
    yield eng
    await eng.shutdown()


def assert_clean(eng: AsyncEngine) -> None:
    sched = eng.core.scheduler
    sched.check_integrity()
    assert not sched.running and sched.num_waiting == 0
    assert sched.kv.num_available_pages == sched.kv.total_pages


async def test_stream_yields_deltas_that_add_up(engine):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = [o async for o in engine.generate("Tell me a story", params)]
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert all(not o.finished for o in outs[:-1])
    assert sum(len(o.token_ids) for o in outs) == 20 == outs[-1].num_output_tokens
    await engine.wait_idle()
    ids = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert outs[-1].first_token_time >= outs[-1].arrival_time
    assert_clean(engine)


async def test_chat_messages_and_token_ids_are_accepted(engine):
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    chat = [o async for o in engine.generate(messages=[{"role": "user", "content": "hi"}], params=p)]
    ids = [o async for o in engine.generate([1, 2, 3, 4], p)]
    assert chat[-1].num_prompt_tokens > 10  # the template's system prompt is in there
    assert ids[-1].num_prompt_tokens == 4


async def test_concurrent_requests_each_finish_once(engine):
    async def one(i):
        return [o async for o in engine.generate(f"request {i}", SamplingParams(temperature=0, max_tokens=8 + i,
                                                                                 ignore_eos=True))]

    results = await asyncio.gather(*(one(i) for i in range(12)))
    for i, outs in enumerate(results):
        assert sum(o.finished for o in outs) == 1 and outs[-1].num_output_tokens == 8 + i
    await engine.wait_idle()
    assert_clean(engine)


async def test_abort_mid_stream_frees_pages(engine):
    agen = engine.generate("abort me", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    got = 0
    async for out in agen:
        got += 1
        if got == 3:
            break
    await agen.aclose()
    await engine.wait_idle()
    assert_clean(engine)


async def test_explicit_abort_ends_the_stream_with_reason_abort(engine):
    outs = []
    async for out in engine.generate("x", SamplingParams(max_tokens=200, ignore_eos=True), request_id="r1"):
        outs.append(out)
        if len(outs) == 2:
            await engine.abort("r1")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs) < 200
    await engine.wait_idle()  # pages come back once the batch in flight is processed
    assert_clean(engine)


@pytest.mark.parametrize("kwargs,field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": "word " * 400}, "prompt"),
    ({"prompt": "hi", "params": SamplingParams(max_tokens=300)}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
])
async def test_bad_input_names_the_field_and_the_engine_keeps_serving(engine, kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        async for _ in engine.generate(**kwargs):
            pass
    assert e.value.field == field
    outs = [o async for o in engine.generate("still here?", SamplingParams(temperature=0, max_tokens=3))]
    assert outs[-1].finished
    await engine.wait_idle()
    assert_clean(engine)


async def test_stop_strings_end_the_request(engine):
    free = [o async for o in engine.generate("The", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))]
    text = "".join(o.text for o in free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a non-blank stop string from the model's own text"
    cut = [o async for o in engine.generate("The", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                      stop=[stop]))]
    assert cut[-1].finish_reason == "stop" and cut[-1].stop_reason == stop
    assert "".join(o.text for o in cut) == text[: text.index(stop)]


async def test_stop_token_ids_and_eos(engine):
    free = [o async for o in engine.generate("The", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    ids = [t for o in free for t in o.token_ids]
    outs = [o async for o in engine.generate("The", SamplingParams(temperature=0, max_tokens=10,
                                                                       stop_token_ids=[ids[4]]))]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == ids[4]
    assert outs[-1].num_output_tokens == ids.index(ids[4]) + 1


def test_unknown_model_and_corrupt_weights_raise_typed_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        AsyncEngine(EngineConfig(model="no-such-model"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="model.safetensors"):
        AsyncEngine(EngineConfig(model=str(broken)))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF not really")
    with pytest.raises(WeightsError, match="bad.gguf"):
        AsyncEngine(EngineConfig(model=str(bad_gguf)))


async def test_engine_thread_death_fails_open_streams(tiny_chat_dir, monkeypatch):
    from conveyor.runtime.async_engine import EngineDeadError

    eng = await AsyncEngine.create(EngineConfig(model=str(tiny_chat_dir), max_model_len=256))

    def broken_drain(block: bool, timeout: float | None = None) -> bool:  # not a step failure (those are survived): the loop itself
        raise RuntimeError("boom")

    agen = eng.generate("hello", SamplingParams(max_tokens=10_000 // 50, ignore_eos=True))
    await agen.__anext__()  # the request is running
    monkeypatch.setattr(eng, "_drain", broken_drain)
    with pytest.raises(EngineDeadError):
        async for _ in agen:
            pass
    # The streams are failed before the thread returns; wait for it to end (bounded).
    await asyncio.to_thread(eng._thread.join, 10)
    assert not eng.is_alive
    with pytest.raises(EngineDeadError):  # and a new request is refused at once, not left hanging
        async for _ in eng.generate("again", SamplingParams(max_tokens=2)):
            pass
