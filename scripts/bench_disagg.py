"""Prefill/decode disaggregation, measured: colocated (one `--role both` worker) against PD (one
`--role prefill` + one `--role decode`, KV over NIXL), on this machine.

1. Transfer ceiling: a NIXL WRITE of scattered KV pages (the pool's geometry, random page ids)
   from this process into another's pool, against a plain copy of the same bytes (memcpy / device copy).
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
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the conveyor checkout this script belongs to

from conveyor.runtime.tools.serve_process import ServeProcess, start_all  # noqa: E402

if TYPE_CHECKING:  # imported late where used: --help and the HTTP parts need no torch
    import torch

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


def _region(t: torch.Tensor, num_pages: int) -> KVRegion:
    from conveyor.runtime.engine.executor import KVCompat, KVRegion

    mem = "VRAM" if t.device.type == "cuda" else "DRAM"
    return KVRegion(t.data_ptr(), t.numel(), mem, t.device.index or 0, LAYERS, num_pages * PAGE_STRIDE, PAGE_STRIDE,
                    KVCompat("bench", "uint8", LAYERS, 1, 1, 16, "layer,page"))


def _receiver(conn: Connection, num_pages: int, device: str) -> None:
    """D's side in its own process, as in PD: a registered pool the writer's WRITEs land in."""
    import torch

    from conveyor.runtime.disagg.nixl import NixlTransport

    dst = torch.zeros(LAYERS * num_pages * PAGE_STRIDE, dtype=torch.uint8, device=device)
    b = NixlTransport(f"bench-b-{os.getpid()}")
    b.register(_region(dst, num_pages))
    conn.send((b.metadata(), dst.data_ptr(), dst.device.index or 0))
    conn.recv()  # the writer is done


def transfer_ceiling(pool_mib: int, pages: int, device: str) -> dict:
    """NIXL WRITE of ``pages`` scattered pages x LAYERS from this process into another's pool (the lane PD
    uses: a transfer to the same process takes another), against a plain copy of the same bytes here."""
    import multiprocessing as mp

    import torch

    from conveyor.runtime.disagg.nixl import NixlTransport
    from conveyor.runtime.disagg.transport import RemotePool, XferState, page_descriptors

    num_pages = max(pages + 1, (pool_mib << 20) // (LAYERS * PAGE_STRIDE))
    src = torch.ones(LAYERS * num_pages * PAGE_STRIDE, dtype=torch.uint8, device=device)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_receiver, args=(child_conn, num_pages, device), daemon=True)
    child.start()
    try:
        if not conn.poll(300):
            raise SystemExit("the receiving process did not come up")
        metadata, dst_addr, dst_dev = conn.recv()
        a = NixlTransport(f"bench-a-{uuid.uuid4().hex[:6]}")
        a.register(_region(src, num_pages))
        peer = a.add_peer(metadata)
        rng = random.Random(0)
        ids = rng.sample(range(1, num_pages), pages)
        local, remote = page_descriptors(_region(src, num_pages), RemotePool(dst_addr, num_pages * PAGE_STRIDE,
                                                                             PAGE_STRIDE, dst_dev),
                                         ids, rng.sample(ids, pages))
        nbytes = sum(n for _, n, _ in local)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            h = a.write(peer, local, remote)
            while (state := a.poll(h)) is XferState.PENDING:
                pass
            assert state is XferState.DONE
            best = min(best, time.perf_counter() - t0)
            a.cancel(h)
        conn.send("done")
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    flat_src = src[:nbytes]
    flat_dst = torch.empty_like(flat_src)
    copy = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        flat_dst.copy_(flat_src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        copy = min(copy, time.perf_counter() - t0)
    return {"bytes": nbytes, "descriptors": len(local), "nixl_write_gbs": nbytes / best / 1e9,
            "copy_ceiling_gbs": nbytes / copy / 1e9, "mem": "VRAM" if device.startswith("cuda") else "DRAM",
            "between": "two processes"}


# -- 2. and 3. over HTTP -----------------------------------------------------------------------
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
    ap.add_argument("--device", default="cpu", help="where the transfer-ceiling buffers live (cpu, cuda)")
    ap.add_argument("--transfer-only", action="store_true", help="measure the transfer ceiling (1.) only")
    ap.add_argument("--out", type=Path, default=Path("docs/bench_disagg"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    result["transfer"] = transfer_ceiling(256, args.ceiling_pages, args.device)
    print("transfer", json.dumps(result["transfer"]))
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
