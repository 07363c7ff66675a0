"""Prefill/decode disaggregation, measured: colocated (one `--role both` worker) against PD (one
`--role prefill` + one `--role decode`, KV over NIXL), on this machine.

1. Transfer ceiling: NIXL WRITEs from this process into another's pool, one pool geometry (30 layers
   x 64 KiB pages, layer-major): scattered pages (random ids), one request's consecutive pages (16, 64,
   256 MiB: a descriptor per layer), the same bytes as one descriptor (what a page-major layout would
   give), 8 requests in flight; through the engine's transport, through prepared descriptor lists, and
   with NIXL's scatter-gather WRITE and UCX thread pool; each checked byte for byte, against a plain copy
   of the same bytes (memcpy / device copy). `--transfer-only` stops there.
2. TTFT at low load, one request at a time: colocated vs PD, and PD's split from D's log
   (D admission, P queue, P compute, side channel + transfer tail).
3. Decode inter-token latency p50/p99 of running streams while a burst of long prompts arrives,
   colocated vs PD. (On one box both roles share the CPU/GPU, so this shows the mechanism, not the
   interference removal two devices give.)

    python scripts/bench_disagg.py --model default --prompt-len 512 --out docs/bench_disagg
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the conveyor checkout this script belongs to

from conveyor.runtime.tools.serve_process import ServeProcess, start_all  # noqa: E402

if TYPE_CHECKING:  # imported late where used: --help and the HTTP parts need no torch
    import torch

    from conveyor.runtime.disagg.nixl import NixlTransport
    from conveyor.runtime.disagg.transport import RemotePool
    from conveyor.runtime.engine.executor import KVRegion


def start_worker(args: argparse.Namespace, role: str) -> ServeProcess:
    log = Path(tempfile.mkstemp(prefix=f"pd-{role}-", suffix=".log")[1])
    return ServeProcess(["--model", args.model, "--role", role, "--max-model-len", str(args.max_model_len),
                         *args.engine_args.split()], log=log)


def room_lines(d: ServeProcess) -> list[dict]:
    """D's "kv room done" log records: each room's TTFT split."""
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if '"kv room done"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


# -- 1. transfer ceiling ----------------------------------------------------------------------
LAYERS, PAGE_STRIDE = 30, 64 << 10  # SmolLM2-135M at page 16 in bf16 is 30 layers x 24 KiB; round up
REQUEST_MIB = (16, 64, 256)  # one request's KV as the allocator hands pages out (consecutive on both sides)
IN_FLIGHT = 8  # 16 MiB requests posted back to back: throughput with several rooms sending, not one's latency
REPS = 5  # timed repetitions after one warm-up; the median is reported
# The engine's transport as configured (runtime/disagg/nixl.py: scatter-gather WRITE on), and the switches
# one at a time against it: NIXL's default posting (a ucp_put_nbx per descriptor), the UCX thread pool.
SENDERS = {"engine": {}, "no-sgl": {"sgl": False}, "no-sgl+threads4": {"sgl": False, "threads": 4},
           "sgl+threads4": {"sgl": True, "threads": 4}}

Descs = list[tuple[int, int, int]]  # (address, bytes, device) as transport.page_descriptors makes them
Write = tuple[Descs, Descs]  # (local, remote) descriptors of one WRITE


def _region(t: torch.Tensor, num_pages: int) -> KVRegion:
    from conveyor.runtime.engine.executor import KVCompat, KVRegion

    mem = "VRAM" if t.device.type == "cuda" else "DRAM"
    return KVRegion(t.data_ptr(), t.numel(), mem, t.device.index or 0, LAYERS, num_pages * PAGE_STRIDE, PAGE_STRIDE,
                    KVCompat("bench", "uint8", LAYERS, 1, 1, 16, "layer,page"))


def _digest(t: torch.Tensor) -> int:
    """A position-sensitive checksum (pages landing in the wrong slot change it), the same on both sides."""
    import torch

    words = t.view(torch.int64)
    total = 0
    for lo in range(0, words.numel(), 1 << 24):  # in chunks: bounded temporaries on CPU
        chunk = words[lo:lo + (1 << 24)]
        weights = torch.arange(lo + 1, lo + 1 + chunk.numel(), dtype=torch.int64, device=t.device)
        total = (total + int((chunk * weights).sum().item())) % (1 << 61)
    return total


def _receiver(conn: Connection, num_pages: int, device: str) -> None:
    """D's side in its own process, as in PD: a registered pool the writer's WRITEs land in. Between
    cases the writer asks it to zero the pool ("zero") or to checksum it ("digest")."""
    import torch

    from conveyor.runtime.disagg.nixl import NixlTransport

    dst = torch.zeros(LAYERS * num_pages * PAGE_STRIDE, dtype=torch.uint8, device=device)
    b = NixlTransport(f"bench-b-{os.getpid()}")
    b.register(_region(dst, num_pages))
    conn.send((b.metadata(), dst.data_ptr(), dst.device.index or 0))
    while (cmd := conn.recv()) != "done":
        if cmd == "zero":
            dst.zero_()
            conn.send("ok")
        else:
            conn.send(_digest(dst))


def _request_pages(mib: int, first_src: int, first_dst: int) -> tuple[list[int], list[int]]:
    """Pages of one request of ``mib`` MiB of KV, consecutive on both sides."""
    n = -(-(mib << 20) // (LAYERS * PAGE_STRIDE))
    return list(range(first_src, first_src + n)), list(range(first_dst, first_dst + n))


def _random_pages(num_pages: int, pages: int) -> tuple[list[int], list[int]]:
    """``pages`` page ids scattered over the pool, sent to the same ids shuffled: nothing coalesces."""
    rng = random.Random(0)
    ids = rng.sample(range(1, num_pages), pages)
    return ids, rng.sample(ids, pages)


def _cases(local: KVRegion, remote: RemotePool, num_pages: int, pages: int) -> dict[str, list[Write]]:
    """Each case: the WRITEs posted back to back, then waited for together."""
    from conveyor.runtime.disagg.transport import page_descriptors

    cases = {f"random {pages} pages": [page_descriptors(local, remote, *_random_pages(num_pages, pages))]}
    for mib in REQUEST_MIB:
        n = len(_request_pages(mib, 0, 0)[0])
        loc, rem = page_descriptors(local, remote, *_request_pages(mib, 1, num_pages - n))
        nbytes = sum(n for _, n, _ in loc)
        cases[f"request {mib} MiB"] = [(loc, rem)]
        cases[f"one descriptor {mib} MiB"] = [([(loc[0][0], nbytes, loc[0][2])], [(rem[0][0], nbytes, rem[0][2])])]
    per = len(_request_pages(16, 0, 0)[0])
    cases[f"{IN_FLIGHT} x request 16 MiB in flight"] = [
        page_descriptors(local, remote, *_request_pages(16, 1 + i * per, num_pages - (i + 1) * per))
        for i in range(IN_FLIGHT)]
    return cases


def _expected_digest(src: torch.Tensor, writes: list[Write], local: KVRegion, remote_addr: int) -> int:
    """The receiver's checksum after ``writes`` land in its zeroed pool."""
    import torch

    image = torch.zeros_like(src)
    for loc, rem in writes:
        for (la, n, _), (ra, _, _) in zip(loc, rem):
            image[ra - remote_addr:ra - remote_addr + n] = src[la - local.addr:la - local.addr + n]
    return _digest(image)


def _time(t: NixlTransport, post: Callable[[], list[Any]]) -> tuple[float, float]:
    """Medians over REPS (after one warm-up) of the seconds to post and to see every WRITE done."""
    from conveyor.runtime.disagg.transport import XferState

    posted: list[float] = []
    done: list[float] = []
    for rep in range(REPS + 1):
        t0 = time.perf_counter()
        handles = post()
        t1 = time.perf_counter()
        for h in handles:
            while (state := t.poll(h)) is XferState.PENDING:
                pass
            if state is not XferState.DONE:
                raise SystemExit(f"a WRITE ended {state}")
        t2 = time.perf_counter()
        for h in handles:
            t.cancel(h)
        if rep:
            posted.append(t1 - t0)
            done.append(t2 - t0)
    return statistics.median(posted), statistics.median(done)


def _prepped_poster(t: NixlTransport, peer: str, local: KVRegion, remote: RemotePool, num_pages: int,
                    src_pages: list[int], dst_pages: list[int]) -> Callable[[], list[Any]]:
    """(d) The same pages through lists prepared once (vLLM's way: ``prep_xfer_dlist`` of every page of
    every layer, ``make_prepped_xfer`` by index; NIXL merges runs of consecutive indices itself): what
    is left of the per-descriptor cost once Python and descriptor lookup are out of the loop is UCX's."""
    import numpy as np

    def rows(addr: int, layer_stride: int, dev: int) -> np.ndarray:
        return np.array([[addr + layer * layer_stride + p * PAGE_STRIDE, PAGE_STRIDE, dev]
                         for layer in range(LAYERS) for p in range(num_pages)], dtype=np.uint64)

    mem = local.mem
    mine = t.agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows(local.addr, local.layer_stride, local.device_id), mem)
    theirs = t.agent.prep_xfer_dlist(peer, rows(remote.addr, remote.layer_stride, remote.device_id), mem)
    li = np.array([layer * num_pages + p for layer in range(LAYERS) for p in src_pages], dtype=np.int32)
    ri = np.array([layer * num_pages + p for layer in range(LAYERS) for p in dst_pages], dtype=np.int32)

    def post() -> list[Any]:
        h = t.agent.make_prepped_xfer("WRITE", mine, li, theirs, ri)
        if t.agent.transfer(h) == "ERR":
            raise SystemExit("prepped WRITE failed at post")
        return [h]

    return post


def transfer_ceiling(pool_mib: int, pages: int, device: str, senders: list[str]) -> dict:
    """NIXL WRITEs from this process into another's pool (the lane PD uses: a transfer to the same process
    takes another), for one pool geometry: scattered pages, a request's consecutive pages, the same bytes as
    one descriptor, several requests in flight; each through the engine's transport and through the NIXL
    switches that cut the per-descriptor cost (``SENDERS``), checked byte for byte; against a plain copy of
    the same bytes here."""
    import multiprocessing as mp

    import torch

    from conveyor.runtime.disagg.nixl import NixlTransport
    from conveyor.runtime.disagg.transport import RemotePool, XferState

    largest = -(-(max(REQUEST_MIB) << 20) // (LAYERS * PAGE_STRIDE))
    num_pages = max(pages + 1, largest + 2, (pool_mib << 20) // (LAYERS * PAGE_STRIDE))
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (LAYERS * num_pages * PAGE_STRIDE,), dtype=torch.uint8, generator=gen).to(device)
    local = _region(src, num_pages)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_receiver, args=(child_conn, num_pages, device), daemon=True)
    child.start()
    rows: list[dict] = []
    try:
        if not conn.poll(300):
            raise SystemExit("the receiving process did not come up")
        metadata, dst_addr, dst_dev = conn.recv()
        remote = RemotePool(dst_addr, num_pages * PAGE_STRIDE, PAGE_STRIDE, dst_dev)
        cases = _cases(local, remote, num_pages, pages)
        expected = {name: _expected_digest(src, writes, local, dst_addr) for name, writes in cases.items()}

        def measure(case: str, sender: str, t: NixlTransport, post: Callable[[], list[Any]], descs: int) -> None:
            conn.send("zero")
            conn.recv()
            for h in post():  # one WRITE into the zeroed pool, then its checksum
                while t.poll(h) is XferState.PENDING:
                    pass
                t.cancel(h)
            conn.send("digest")
            correct = conn.recv() == expected[case]
            posted, done = _time(t, post)
            nbytes = sum(n for loc, _ in cases[case] for _, n, _ in loc)
            rows.append({"case": case, "sender": sender, "bytes": nbytes, "writes": len(cases[case]),
                         "descriptors": descs, "post_ms": round(posted * 1e3, 3), "done_ms": round(done * 1e3, 3),
                         "gbs": round(nbytes / done / 1e9, 2), "us_per_descriptor": round(done / descs * 1e6, 2),
                         "correct": correct})
            print("transfer", json.dumps(rows[-1]), flush=True)

        for sender in senders:
            t = NixlTransport(f"bench-a-{sender}-{uuid.uuid4().hex[:6]}", **SENDERS[sender])
            t.register(local)
            peer = t.add_peer(metadata)
            for case, writes in cases.items():
                def post(t: NixlTransport = t, peer: str = peer, writes: list[Write] = writes) -> list[Any]:
                    return [t.write(peer, loc, rem) for loc, rem in writes]

                measure(case, sender, t, post, sum(len(loc) for loc, _ in writes))
            if sender == "engine":
                case = f"random {pages} pages"
                measure(case, "engine, prepped lists", t,
                        _prepped_poster(t, peer, local, remote, num_pages, *_random_pages(num_pages, pages)),
                        len(cases[case][0][0]))
        conn.send("done")
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    copy_gbs: dict[int, float] = {}
    for nbytes in sorted({r["bytes"] for r in rows}):
        flat_src = src[:nbytes]
        flat_dst = torch.empty_like(flat_src)
        times: list[float] = []
        for _ in range(REPS + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            flat_dst.copy_(flat_src)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        copy_gbs[nbytes] = round(nbytes / statistics.median(times[1:]) / 1e9, 2)
    for r in rows:
        r["copy_ceiling_gbs"] = copy_gbs[r["bytes"]]
    return {"mem": local.mem, "between": "two processes", "page_stride": PAGE_STRIDE, "layers": LAYERS,
            "pool_pages": num_pages, "reps": REPS, "stat": "median", "cases": rows}


def _print_table(transfer: dict) -> None:
    print(f"{'case':34} {'sender':22} {'MiB':>6} {'descs':>6} {'post ms':>8} {'done ms':>8} {'GB/s':>8} "
          f"{'us/desc':>8} {'copy GB/s':>9} ok")
    for r in transfer["cases"]:
        print(f"{r['case']:34} {r['sender']:22} {r['bytes'] / 2**20:6.1f} {r['descriptors']:6d} {r['post_ms']:8.3f} "
              f"{r['done_ms']:8.3f} {r['gbs']:8.2f} {r['us_per_descriptor']:8.2f} {r['copy_ceiling_gbs']:9.2f} "
              f"{'yes' if r['correct'] else 'NO'}")


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


async def stream(http: aiohttp.ClientSession, url: str, body: dict, headers: dict,
                 times: list[float] | None = None) -> list[float]:
    """Arrival times of each streamed chunk that carries text (appended to ``times`` as they come)."""
    times = [] if times is None else times
    async with http.post(url + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    return times


def headers_for(p: ServeProcess | None) -> dict:
    return {} if p is None else {"X-Conveyor-Room": uuid.uuid4().hex, "X-Conveyor-Prefill": p.url}


async def ttft(url: str, p: ServeProcess | None, n: int, prompt_len: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            t0 = time.perf_counter()
            times = await stream(http, url, {"prompt": prompt(prompt_len, 50 + i), "max_tokens": 2,
                                             "temperature": 0}, headers_for(p))
            out.append(times[0] - t0)
    return out


async def itl_under_burst(url: str, p: ServeProcess | None, args: argparse.Namespace) -> dict:
    """Decoders stream until a burst of long prompts has been served; the gaps between their tokens
    that end inside the burst window are the inter-token latency the burst inflicts."""
    async with aiohttp.ClientSession() as http:
        body = {"max_tokens": args.decode_tokens, "temperature": 0, "ignore_eos": True}
        times: list[list[float]] = [[] for _ in range(args.decoders)]
        decoders = [asyncio.create_task(stream(http, url, {**body, "prompt": prompt(16, 900 + i)}, headers_for(p),
                                               times[i])) for i in range(args.decoders)]
        deadline = time.perf_counter() + 60
        while any(len(t) < 3 for t in times) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)  # every decoder is past its first tokens: steady decoding
        await asyncio.sleep(args.burst_after_s)
        t_burst = time.perf_counter()
        burst = [asyncio.create_task(stream(http, url, {"prompt": prompt(args.prompt_len, 700 + i), "max_tokens": 1,
                                                        "temperature": 0}, headers_for(p)))
                 for i in range(args.burst)]
        await asyncio.gather(*burst)
        t_end = time.perf_counter()
        running = sum(1 for d in decoders if not d.done())
        for d in decoders:
            d.cancel()
        await asyncio.gather(*decoders, return_exceptions=True)
    gaps = sorted(b - a for s in times for a, b in zip(s, s[1:]) if t_burst <= b <= t_end)
    pick = (lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else float("nan"))
    return {"gaps": len(gaps), "itl_p50_ms": pick(0.5) * 1e3, "itl_p99_ms": pick(0.99) * 1e3,
            "burst_s": t_end - t_burst, "decoders_still_running_at_burst_end": running}


def split(rooms: list[dict]) -> dict:
    keys = ("d_admission_s", "p_queue_s", "p_compute_s", "transfer_tail_s")
    return {k: statistics.mean(r[k] for r in rooms if r.get(k) is not None) for k in keys} if rooms else {}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    arms = ["colocated", "pd"]
    for i, q in enumerate(("itl_p50_ms", "itl_p99_ms")):
        ax1.bar([x + 0.4 * i for x in range(2)], [result["itl"][a][q] for a in arms], width=0.4, label=q)
    ax1.set_xticks([0.2, 1.2], arms)
    ax1.set_ylabel("decode inter-token latency during the burst (ms)")
    ax1.legend()
    bottom = 0.0
    for k, v in result["ttft_split_s"].items():
        ax2.bar(["pd"], [v * 1e3], bottom=bottom, label=k)
        bottom += v * 1e3
    ax2.bar(["colocated"], [statistics.mean(result["ttft_s"]["colocated"]) * 1e3], label="colocated TTFT")
    ax2.set_ylabel("TTFT (ms)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench_disagg.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--engine-args", default="", help="more engine flags for every worker, one string")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--ttft-requests", type=int, default=8)
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=1000, help="decoders' max_tokens: must outlast the burst")
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--burst-after-s", type=float, default=0.2)
    ap.add_argument("--ceiling-pages", type=int, default=256, help="pages per WRITE (30 layers x 64 KiB each)")
    ap.add_argument("--ceiling-senders", default=",".join(SENDERS),
                    help=f"comma-separated NIXL sender setups for the transfer ceiling, of {', '.join(SENDERS)}")
    ap.add_argument("--device", default="cpu", help="where the transfer-ceiling buffers live (cpu, cuda)")
    ap.add_argument("--transfer-only", action="store_true", help="measure the transfer ceiling (1.) only")
    ap.add_argument("--out", type=Path, default=Path("docs/bench_disagg"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    result["transfer"] = transfer_ceiling(256, args.ceiling_pages, args.device, args.ceiling_senders.split(","))
    _print_table(result["transfer"])
    if args.transfer_only:
        return
    c, p, d = (start_worker(args, role) for role in ("both", "prefill", "decode"))
    try:
        start_all((c, p, d), timeout_s=600)
        result["ttft_s"] = {"colocated": asyncio.run(ttft(c.url, None, args.ttft_requests, args.prompt_len)),
                            "pd": asyncio.run(ttft(d.url, p, args.ttft_requests, args.prompt_len))}
        result["ttft_split_s"] = split(room_lines(d))
        result["itl"] = {"colocated": asyncio.run(itl_under_burst(c.url, None, args)),
                         "pd": asyncio.run(itl_under_burst(d.url, p, args))}
    finally:
        for w in (c, p, d):
            w.stop()
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1))
    (args.out / "bench_disagg.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out)


if __name__ == "__main__":
    main()
