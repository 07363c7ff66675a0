"""Tensor parallelism on the CPU: TP=2 in two real processes (gloo) against TP=1 on the same weights.

Logprobs (sampled and prompt) agree within fp32 tolerance and greedy tokens are equal, through
chunked prefill, preemption in a small KV pool and prefix-cache hits, at depths 1 and 2; a killed
worker rank fails the engine at once; ``conveyor serve --tensor-parallel-size 2`` answers. The
ring, the wire format and the sharding rules are checked on their own, in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from conveyor.memory import SwapOp
from conveyor.memory.swap_space import SwapKind
from conveyor.model import resolve_model
from conveyor.model.parallel import Sharding
from conveyor.model.presets import preset
from conveyor.runtime.build import build_engine
from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.core import EngineCore
from conveyor.runtime.tools.driver import run_until_idle
from conveyor.runtime.tools.serve_process import ServeProcess
from conveyor.runtime.worker import tp_wire
from conveyor.runtime.worker.shm_ring import PeerGone, RingReader, RingWriter
from conveyor.scheduler import PoolWrite, Request, SamplingParams, ScheduledBatch, ScheduledSeq
from tests.conftest import kv_bytes_for_pages

PAGES = 14  # small enough that six requests of ~70 tokens preempt each other
BLOCK = 16
DEADLINE_S = 60.0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def engine_config(model_dir: Path, tp: int, **overrides: object) -> EngineConfig:
    # Each rank's pool holds its share of the KV heads: the same page count takes 1/tp of the bytes.
    kv = kv_bytes_for_pages(str(model_dir), PAGES, BLOCK) // tp
    base = {"model": str(model_dir), "tensor_parallel_size": tp, "kv_cache_memory": kv, "block_size": BLOCK,
            "max_model_len": PAGES * BLOCK, "max_num_batched_tokens": 32, "max_num_seqs": 8, "seed": 0}
    base.update(overrides)
    return EngineConfig(**base)  # type: ignore[arg-type]


def prompt_set() -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 500, 40).tolist()  # two requests share 2 full pages: a prefix-cache hit
    prompts = [shared + rng.integers(3, 500, 9).tolist(), shared + rng.integers(3, 500, 21).tolist()]
    prompts += [rng.integers(3, 500, int(n)).tolist() for n in (5, 47, 33, 60)]
    out = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=3, prompt_logprobs=2 if i == 3 else None,
                                ignore_eos=True)
        out.append((p, params))
    return out


class Run:
    def __init__(self, core: EngineCore) -> None:
        reqs = [core.inputs.make_request(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(prompt_set())]
        self.logprobs: dict[str, list[float]] = {r.request_id: [] for r in reqs}
        self.prompt_logprobs: dict[str, list[float]] = {}

        def collect(outputs: list) -> None:
            for out in outputs:
                assert out.error is None, out.error
                self.logprobs[out.request_id] += [v for lp in out.logprobs or [] for v in
                                                  [lp.logprob, *(t.logprob for t in lp.top)]]
                if out.prompt_logprobs is not None:
                    self.prompt_logprobs[out.request_id] = [x.logprob for x in out.prompt_logprobs if x is not None]

        before = core.stats()
        run_until_idle(core, reqs, after_step=collect)
        after = core.stats()
        self.tokens = {r.request_id: list(r.output_token_ids) for r in reqs}
        self.preemptions = after.num_preemptions - before.num_preemptions
        self.prefix_hits = after.prefix_hit_tokens - before.prefix_hit_tokens

    def assert_matches(self, ref: Run) -> None:
        assert self.tokens == ref.tokens
        for rid, values in ref.logprobs.items():
            np.testing.assert_allclose(self.logprobs[rid], values, atol=2e-4, rtol=0)
        assert self.prompt_logprobs.keys() == ref.prompt_logprobs.keys() == {"r3"}
        np.testing.assert_allclose(self.prompt_logprobs["r3"], ref.prompt_logprobs["r3"], atol=2e-4, rtol=0)


def reference(model_dir: Path) -> Run:
    core = build_engine(engine_config(model_dir, 1))
    try:
        return Run(core)
    finally:
        core.close()


def test_tp2_llama_matches_tp1_through_chunking_preemption_and_the_prefix_cache(tiny_llama_dir: Path) -> None:
    """One TP group at a time per process (the default process group): both depths on one engine."""
    ref = reference(tiny_llama_dir)
    assert ref.preemptions > 0  # the pool is small enough to preempt
    core = build_engine(engine_config(tiny_llama_dir, 2))
    try:
        assert core.executor.kv_layout.num_pages == PAGES
        run = Run(core)
        assert run.preemptions > 0
        run.assert_matches(ref)
        core.pipeline_depth = 1  # the same ranks: depth is the engine's alone
        again = Run(core)
        assert again.prefix_hits > 0  # the same prompts again: their pages are cached
        again.assert_matches(ref)
    finally:
        core.close()


def test_tp2_debug_checks_hash_sampled_ids_across_ranks(tiny_qwen3_dir: Path) -> None:
    """Qwen3 (q/k norms, tied embeddings) at TP=2, with every step's ids and argmax compared across ranks."""
    ref = reference(tiny_qwen3_dir)
    old = os.environ.get("CONVEYOR_DEBUG_CHECKS")
    os.environ["CONVEYOR_DEBUG_CHECKS"] = "1"  # read by every rank at startup
    try:
        core = build_engine(engine_config(tiny_qwen3_dir, 2))
    finally:
        if old is None:
            os.environ.pop("CONVEYOR_DEBUG_CHECKS")
        else:
            os.environ["CONVEYOR_DEBUG_CHECKS"] = old
    try:
        assert core.executor.local.runner.debug_checks
        Run(core).assert_matches(ref)
    finally:
        core.close()


@pytest.fixture(scope="module")
def tiny_qwen2_one_kv_head_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2's q/k/v biases and a single KV head: at TP=2 both ranks hold a replica of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{**preset("tiny-llama"), "model_type": "qwen2", "num_key_value_heads": 1})
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)  # biases too, so a mis-sliced bias shows
    out = tmp_path_factory.mktemp("tiny-qwen2-kv1")
    hf.save_pretrained(str(out))
    return out


def test_tp2_replicates_a_kv_head_and_swaps_preempted_kv(tiny_qwen2_one_kv_head_dir: Path) -> None:
    """One KV head on both ranks, and swap preemption: every rank copies its KV shard out and back."""
    ref_core = build_engine(engine_config(tiny_qwen2_one_kv_head_dir, 1, preemption_mode="swap"))
    try:
        ref = Run(ref_core)
    finally:
        ref_core.close()
    # Replicated, a rank's pages are as large as TP=1's: the same bytes give the same page count.
    kv = kv_bytes_for_pages(str(tiny_qwen2_one_kv_head_dir), PAGES, BLOCK)
    core = build_engine(engine_config(tiny_qwen2_one_kv_head_dir, 2, kv_cache_memory=kv, preemption_mode="swap"))
    try:
        assert core.executor.kv_layout.num_pages == PAGES and core.executor.worker.kv_pool.data.shape[-2] == 1
        run = Run(core)
        assert core.stats().num_swapped_in > 0 and ref_core.stats().num_swapped_in > 0
        run.assert_matches(ref)
    finally:
        core.close()


def test_killed_worker_rank_fails_the_engine_and_its_streams(tiny_llama_dir: Path) -> None:
    from conveyor.runtime.async_engine import AsyncEngine
    from conveyor.runtime.engine.client import EngineDeadError

    async def scenario() -> None:
        engine = await AsyncEngine.create(engine_config(tiny_llama_dir, 2, max_model_len=None,
                                                        kv_cache_memory=64 << 20))
        ranks = engine.core.executor.ranks
        pid = ranks.pids[0]
        try:
            got = 0
            with pytest.raises(EngineDeadError):
                async for out in engine.generate(list(range(3, 40)), SamplingParams(max_tokens=900, ignore_eos=True)):
                    got += len(out.token_ids)
                    if got >= 3 and ranks.alive():
                        os.kill(pid, signal.SIGKILL)
            assert got < 900
            wait_for(lambda: not engine.is_alive, "the engine thread to stop")
            assert "rank 1" in (ranks.dead or "") and f"pid {pid}" in (ranks.dead or "")
        finally:
            await asyncio.wait_for(engine.shutdown(), DEADLINE_S)
            await asyncio.wait_for(asyncio.to_thread(engine.core.close), DEADLINE_S)  # drains nothing: no hang
        assert all(p.poll() is not None for p in ranks.procs)

    asyncio.run(asyncio.wait_for(scenario(), 2 * DEADLINE_S))


@pytest.mark.slow
def test_default_model_at_tp3_answers_as_tp1(default_llm) -> None:
    """SmolLM2-135M (9 heads, 3 KV heads: it splits 3 ways, not 2), three processes against the shared TP=1 LLM."""
    from conveyor.runtime import LLM

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = [c.token_ids for c in default_llm.generate(prompts, params, use_tqdm=False)]
    llm = LLM("default", tensor_parallel_size=3, kv_cache_memory=32 << 20, max_model_len=256)
    try:
        assert [c.token_ids for c in llm.generate(prompts, params, use_tqdm=False)] == ref
    finally:
        llm.close()


def test_unshardable_models_are_refused_before_any_rank_starts(default_dir: Path) -> None:
    # SmolLM2-135M has 9 attention heads: not a multiple of 2.
    with pytest.raises(ConfigError, match="9 attention heads"):
        build_engine(EngineConfig(model=str(default_dir), tensor_parallel_size=2))


def test_serve_with_tensor_parallel_size_2_answers_a_completion(tiny_chat_dir: Path) -> None:
    srv = ServeProcess(["--model", str(tiny_chat_dir), "--tensor-parallel-size", "2", "--kv-cache-memory", "64MiB",
                        "--max-model-len", "256"])
    url = srv.url

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    try:
        srv.wait_healthy(time.monotonic() + 120)
        body = json.dumps({"prompt": "Hello", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer["usage"]["completion_tokens"] == 5
        # A grammar row: rank 0 fills the mask and samples; the other rank never sees the mask.
        body = json.dumps({"prompt": "Code:", "max_tokens": 12, "temperature": 0.8, "seed": 3,
                           "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}).encode()
        constrained = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(constrained, timeout=30) as resp:
            text = json.loads(resp.read())["choices"][0]["text"]
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
        children = [int(c) for task in Path(f"/proc/{srv.pid}/task").iterdir()  # spawned by whichever thread built it
                    for c in (task / "children").read_text().split()]
        workers = [c for c in children if b"tp_worker" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)  # a dead rank: the server says so, and stays up to say it
        with pytest.raises(urllib.error.HTTPError), urllib.request.urlopen(req, timeout=30):
            pass  # the request that finds the rank dead fails
        wait_for(lambda: status("/health") == 503, "/health to report the dead engine")
    finally:
        srv.stop(timeout_s=DEADLINE_S)


# -- the parts, in-process ------------------------------------------------------------------

def test_ring_carries_messages_longer_than_a_slot_to_every_reader() -> None:
    writer = RingWriter(num_readers=2, num_slots=3, slot_bytes=64)
    readers = [RingReader(writer.name, r, 2, 3, 64) for r in range(2)]
    messages = [bytes([i]) * n for i, n in enumerate((1, 64, 65, 500, 0, 7) * 3)]
    got: list[list[bytes]] = [[], []]

    def read(r: int) -> None:
        for _ in messages:
            got[r].append(readers[r].read(lambda: True))

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for m in messages:  # 3 slots: the writer must wait for both readers many times over
        writer.write(m, lambda: True)
    for t in threads:
        t.join(DEADLINE_S)
    assert got == [messages, messages]
    for r in readers:
        r.close()
    writer.close()


def test_ring_waits_give_up_when_the_peer_is_gone() -> None:
    writer = RingWriter(num_readers=1, num_slots=2, slot_bytes=16)
    reader = RingReader(writer.name, 0, 1, 2, 16)
    with pytest.raises(PeerGone):
        reader.read(lambda: False)  # nothing written, writer "dead"
    writer.write(b"a", lambda: True)
    writer.write(b"b", lambda: True)
    with pytest.raises(PeerGone):
        writer.write(b"c", lambda: False)  # both slots unread, reader "dead"
    reader.close()
    writer.close()


def test_wire_round_trip_keeps_what_the_runner_reads() -> None:
    req = Request("a", list(range(40)), SamplingParams(max_tokens=4, prompt_logprobs=2), 4)
    other = Request("b", [1, 2, 3], SamplingParams(max_tokens=4), 4)
    seqs = (ScheduledSeq(other, slot=3, start=2, num_tokens=1, samples=True, pages=(7, 8, 9), sample_index=1, epoch=0),
            ScheduledSeq(req, slot=1, start=16, num_tokens=20, samples=False, pages=(4, 5, 6, 11), sample_index=0,
                         epoch=2))
    batch = ScheduledBatch(9, seqs, 1, (PoolWrite(1, 0, (5, 6, 7)),), (), (SwapOp(SwapKind.OUT, 3, (4, 5)),), (2,))
    sender, receiver = tp_wire.PageTableSender(page_size=16), tp_wire.PageTableReceiver()

    def send(b: ScheduledBatch) -> tuple[ScheduledBatch, int]:
        payload, tables = sender.encode(b)
        sender.commit(tables)
        msg = tp_wire.decode(payload)
        assert isinstance(msg, tp_wire.BatchMsg)
        return receiver.decode(msg), len(msg.pages) // 4

    back, sent = send(batch)
    assert (back.step_id, back.num_decodes, back.freed_slots, back.swaps) == (9, 1, (2,), batch.swaps)
    assert [(w.slot, w.start, list(w.token_ids)) for w in back.pool_writes] == [(1, 0, [5, 6, 7])]
    for a, b in zip(back.seqs, seqs):
        assert (a.slot, a.start, a.num_tokens, a.samples, a.sample_index) == \
               (b.slot, b.start, b.num_tokens, b.samples, b.sample_index)
    assert [list(s.pages) for s in back.seqs] == [[7], [4, 5, 6]] and sent == 4  # only pages the KV reaches
    assert back.seqs[1].request.params.prompt_logprobs == 2 and back.seqs[1].request.num_prompt_tokens == 40
    assert back.seqs[0].request.params.prompt_logprobs is None
    # Next steps: slot 3's table grows by one page, slot 1's is unchanged, then slot 3 gets a new owner.
    grow = (ScheduledSeq(other, slot=3, start=16, num_tokens=1, samples=True, pages=(7, 8, 9), sample_index=2, epoch=0),
            ScheduledSeq(req, slot=1, start=36, num_tokens=4, samples=True, pages=(4, 5, 6, 11), sample_index=0,
                         epoch=2))
    back, sent = send(ScheduledBatch(10, grow, 1, (), ()))
    assert [list(s.pages) for s in back.seqs] == [[7, 8], [4, 5, 6]] and sent == 1
    new_owner = (ScheduledSeq(other, slot=3, start=0, num_tokens=20, samples=True, pages=(12, 13), sample_index=0,
                              epoch=1),)
    back, sent = send(ScheduledBatch(11, new_owner, 0, (), ()))
    assert [list(s.pages) for s in back.seqs] == [[12, 13]] and sent == 2


def test_sharding_splits_heads_and_replicates_kv_heads_below_the_rank_count() -> None:
    cfg = resolve_model("tiny-llama").config  # 4 heads, 2 KV heads, head_dim 16
    two = [Sharding(cfg, r, 2) for r in range(2)]
    assert [s.kv[1:3] for s in two] == [(0, 16), (16, 32)]
    four = [Sharding(cfg, r, 4) for r in range(4)]
    assert [s.q[1:3] for s in four] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert [s.kv[1:3] for s in four] == [(0, 16), (0, 16), (16, 32), (16, 32)]  # query heads 0,1 read KV head 0
    assert all(s.local_config().num_kv_heads == 1 for s in four)
    full = torch.arange(cfg.vocab_size * 2.0).view(cfg.vocab_size, 2)
    cfg3 = msgspec.structs.replace(cfg, num_heads=6, num_kv_heads=3, intermediate_size=126)
    three = [Sharding(cfg3, r, 3) for r in range(3)]  # 512 rows: 171 each, the last padded with a zero row
    parts = [s.slice_fused("embed_tokens.weight", full) for s in three]
    assert [p.shape[0] for p in parts] == [171] * 3
    assert torch.equal(torch.cat(parts)[: cfg.vocab_size], full) and not parts[2][-1].any()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_ranks_exit_when_rank_0_is_killed(tiny_llama_dir: Path) -> None:
    code = ("import time; from conveyor.runtime.build import build_engine; "
            "from conveyor.runtime.engine.config import EngineConfig; "
            f"core = build_engine(EngineConfig(model={str(tiny_llama_dir)!r}, tensor_parallel_size=2, "
            "kv_cache_memory=64 << 20)); print('PID', core.executor.ranks.pids[0], flush=True); time.sleep(600)")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line: list[bytes] = []
    threading.Thread(target=lambda: line.extend(x for x in proc.stdout or [] if x.startswith(b"PID ")),
                     daemon=True).start()
    try:
        wait_for(lambda: bool(line) or proc.poll() is not None, "rank 0 to start its group", 120)
        worker = int(line[0].split()[1])
        assert not _gone(worker)
        proc.kill()  # no atexit, no close: only the rank's own watchdog can notice
        proc.wait(DEADLINE_S)
        wait_for(lambda: _gone(worker), "the orphaned rank to exit", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_on_two_gpus_with_graphs_matches_tp1(tiny_llama_dir: Path) -> None:
    """NCCL, with the collectives captured in the decode and piecewise graphs (bf16: a looser tolerance)."""
    def run(tp: int) -> Run:
        core = build_engine(engine_config(tiny_llama_dir, tp, device="cuda", kv_cache_memory=None,
                                          gpu_memory_utilization=0.3, max_model_len=None))
        try:
            runner = core.executor.worker.runner if tp == 1 else core.executor.local.runner
            assert runner.graphs is not None and runner.pieces is not None
            return Run(core)
        finally:
            core.close()

    ref, tp2 = run(1), run(2)
    agree = sum(a == b for rid in ref.tokens for a, b in zip(ref.tokens[rid], tp2.tokens[rid]))
    assert agree >= 0.95 * sum(map(len, ref.tokens.values()))
    first = [(rid, toks[0]) for rid, toks in ref.tokens.items()]
    assert first == [(rid, toks[0]) for rid, toks in tp2.tokens.items()]
    np.testing.assert_allclose(tp2.prompt_logprobs["r3"], ref.prompt_logprobs["r3"], atol=0.1, rtol=0)
