#!/usr/bin/env python3
"""Goodput under TTFT and TPOT SLOs, swept over request rate: one prefill + one decode worker (PD)
against two colocated replicas, each behind `conveyor router` (the same number of workers, so the
same GPU count: `--worker-gpus auto` gives each worker its own GPU where there are enough).

    python scripts/bench_pd_goodput.py --model qwen3-0.6b --engine-args "--load-format dummy --tokenizer DIR" \
        --workload long --rates 1,2,4,8 --slo ttft_ms=3000,tpot_ms=40 --out docs/bench_pd_goodput

Workloads: `long` (4096-token prompts, 256 outputs: where PD should win) and `chat` (256 / 256: where
the literature says it loses); `--input-len` / `--output-len` override either. Each arm: the router
and its workers started as child processes, `conveyor loadgen` run against it (Poisson arrivals,
ignore EOS, the same seed), stopped by PID. Prints a row per arm and rate, writes the JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the conveyor checkout this script belongs to

from conveyor.runtime.tools.serve_process import ServeProcess  # noqa: E402

ARMS = {"pd": "1p1d", "replicas": "2"}  # --launch specs with the same number of workers
WORKLOADS = {"long": ("4096", "256"), "chat": ("256", "256")}
FIELDS = ("request_throughput", "request_goodput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
          "median_tpot_ms", "p99_tpot_ms", "completed", "failed")


def run_arm(name: str, spec: str, args: argparse.Namespace, out: Path) -> list[dict]:
    log = Path(tempfile.mkstemp(prefix=f"pd-goodput-{name}-", suffix=".log")[1])
    router = ServeProcess(["--launch", spec, "--model", args.model, "--worker-gpus", args.worker_gpus,
                           *args.engine_args.split()], log=log, command="router")
    result = out / f"{name}.json"
    try:
        # The router's /health says 503 "loading" until every worker it launched answers.
        router.wait_healthy(time.monotonic() + args.start_timeout)
        input_len, output_len = WORKLOADS[args.workload]
        loadgen = [sys.executable, "-m", "conveyor", "loadgen", "--base-url", router.url, "--no-progress",
                   "--ignore-eos", "--input-len", args.input_len or input_len, "--output-len",
                   args.output_len or output_len, "--num-prompts", str(args.num_prompts), "--num-warmups", "2",
                   "--seed", "0", "--request-rate", args.rates, "--slo", args.slo, "--result-json", str(result),
                   *(["--tokenizer", args.tokenizer] if args.tokenizer else [])]
        subprocess.run(loadgen, cwd=ROOT, check=True, timeout=args.run_timeout, stdout=subprocess.DEVNULL)
    finally:
        router.stop(timeout_s=60)  # SIGTERM: the router drains and stops its workers; SIGKILL past 60 s
    files = [result] if result.exists() else sorted(out.glob(f"{name}-rate*.json"))
    rows = [json.loads(p.read_text()) for p in files]
    return sorted(rows, key=lambda r: float(r["request_rate"]))


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, rows in summary["arms"].items():
        rates = [float(r["request_rate"]) for r in rows]
        ax1.plot(rates, [r["request_goodput"] for r in rows], marker="o", label=arm)
        ax2.plot(rates, [r["p99_tpot_ms"] for r in rows], marker="o", label=arm)
    ax1.set(xlabel="request rate (req/s)", ylabel="goodput (req/s)", title=f"{summary['workload']}: goodput, SLO {summary['slo']}")
    ax2.set(xlabel="request rate (req/s)", ylabel="p99 TPOT (ms)", title="p99 time per output token")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"bench_pd_goodput_{summary['workload']}.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--engine-args", default="", help="more flags for every worker, one string")
    ap.add_argument("--worker-gpus", default="auto", help="the router's --worker-gpus (default: auto)")
    ap.add_argument("--tokenizer", default=None, help="loadgen's --tokenizer: exact prompt lengths")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="long")
    ap.add_argument("--input-len", default=None, help="prompt tokens, LO:HI or one number (default: the workload's)")
    ap.add_argument("--output-len", default=None, help="output tokens (default: the workload's)")
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    ap.add_argument("--rates", default="1,2,4,8", help="request rates (req/s), comma-separated")
    ap.add_argument("--slo", default="ttft_ms=3000,tpot_ms=40", help="goodput SLO (loadgen's --slo)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"which of {', '.join(ARMS)}")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="bound on one arm's whole sweep")
    ap.add_argument("--out", type=Path, default=Path("docs/bench_pd_goodput"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    summary: dict = {"workload": args.workload, "slo": args.slo, "args": {k: str(v) for k, v in vars(args).items()},
                     "arms": {}}
    for arm in arms:
        rows = run_arm(arm, ARMS[arm], args, args.out)
        summary["arms"][arm] = [{"request_rate": r["request_rate"], **{f: r.get(f) for f in FIELDS}} for r in rows]
    print(f"{'arm':>9} {'rate':>6} {'req/s':>7} {'goodput':>8} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} "
          f"{'TPOT p50':>9} {'p99':>7} {'failed':>6}")
    for arm, rows in summary["arms"].items():
        for r in rows:
            print(f"{arm:>9} {float(r['request_rate']):>6.2f} {r['request_throughput']:>7.2f} "
                  f"{r['request_goodput'] or 0:>8.2f} {r['output_throughput']:>10.1f} {r['median_ttft_ms']:>9.1f} "
                  f"{r['p99_ttft_ms']:>8.1f} {r['median_tpot_ms']:>9.2f} {r['p99_tpot_ms']:>7.2f} {r['failed']:>6}")
    if {"pd", "replicas"} <= summary["arms"].keys():
        pairs = zip(summary["arms"]["pd"], summary["arms"]["replicas"])
        summary["goodput_pd_over_replicas"] = {str(p["request_rate"]): (p["request_goodput"] or 0) / q["request_goodput"]
                                               if q["request_goodput"] else None for p, q in pairs}
        print("goodput PD / replicas by rate:", summary["goodput_pd_over_replicas"])
    (args.out / f"bench_pd_goodput_{args.workload}.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.out)


if __name__ == "__main__":
    main()
