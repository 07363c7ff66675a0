"""``conveyor router`` flags. Flags the router does not know go to the workers ``--launch`` starts."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from conveyor.runtime.engine_args import parse_bytes
from conveyor.runtime.logging import LEVELS, configure_logging
from conveyor.runtime.router.config import RouterSettings
from conveyor.runtime.router.launcher import parse_launch, plan_children, visible_gpus
from conveyor.runtime.router.policy import PolicyConfig
from conveyor.runtime.router.serve import LaunchPlan, run_router

EPILOG = """examples:
  conveyor router --worker http://10.0.0.1:8000,http://10.0.0.2:8000 --port 8000
  conveyor router --prefill http://p0:8100 --decode http://d0:8200,http://d1:8200
  conveyor router --launch 2 --model default                # two --role both replicas
  conveyor router --launch 1p1d --model default --device cpu   # one prefill + one decode worker
"""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conveyor router", epilog=EPILOG, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="One OpenAI-compatible endpoint in front of Conveyor workers: "
                                "prefix-aware and least-load routing over replicas, or prefill/decode pairs.")
    g = p.add_argument_group("workers")
    g.add_argument("--worker", type=_csv, default=[], metavar="URL,...", help="plain replicas (--role both)")
    g.add_argument("--prefill", type=_csv, default=[], metavar="URL,...", help="PD: prefill workers")
    g.add_argument("--decode", type=_csv, default=[], metavar="URL,...", help="PD: decode workers")
    g.add_argument("--launch", default=None, metavar="N|XpYd",
                   help="start the workers here as child processes: N replicas, or X prefill + Y decode (1p1d); "
                   "flags the router does not know (--device, --gpu-memory-utilization, ...) go to every worker")
    g.add_argument("--model", default="default", help="with --launch: the workers' --model (default: default)")
    g.add_argument("--worker-gpus", default="auto", metavar="auto|share|ID,...",
                   help="with --launch: auto gives each worker its own GPUs (tensor_parallel_size of them) when "
                   "there are enough of the visible ones, else they share; share: every worker sees every GPU; "
                   "a list: the GPU ids to split among the workers (default: auto)")
    g.add_argument("--launch-timeout", type=float, default=600.0,
                   help="seconds launched workers get to answer /health (default: 600; the first start downloads)")
    g.add_argument("--worker-stop-timeout", type=float, default=40.0,
                   help="seconds launched workers get to stop after SIGTERM before SIGKILL (default: 40)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--max-request-body", type=parse_bytes, default=4 << 20, help="default: 4MiB (413 beyond)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds relayed requests get to finish on SIGINT/SIGTERM (default: 30)")
    s.add_argument("--log-level", default=None, choices=list(LEVELS), help="default: info")
    r = p.add_argument_group("routing (sgl-router's cache_aware policy)")
    r.add_argument("--cache-threshold", type=float, default=0.5,
                   help="share of a prompt a worker must have seen for a prefix hit (default: 0.5)")
    r.add_argument("--balance-abs-threshold", type=int, default=32,
                   help="in-flight difference beyond which ... (default: 32)")
    r.add_argument("--balance-rel-threshold", type=float, default=1.5,
                   help="... and ratio beyond which loads count as imbalanced: then least load wins (default: 1.5)")
    r.add_argument("--max-tree-chars", type=int, default=1 << 22,
                   help="prompt characters remembered per worker, LRU beyond (default: 4194304)")
    h = p.add_argument_group("health")
    h.add_argument("--health-interval", type=float, default=2.0, help="seconds between checks (default: 2)")
    h.add_argument("--health-timeout", type=float, default=2.0, help="bound on one /health (default: 2)")
    h.add_argument("--connect-timeout", type=float, default=5.0, help="bound on connecting to a worker (default: 5)")
    h.add_argument("--scrape-timeout", type=float, default=2.0,
                   help="bound on one worker's /metrics when the router's is scraped (default: 2)")
    return p


def main(argv: Sequence[str], default_log_level: str | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    if rest and args.launch is None:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (engine flags only go with --launch)")
    configure_logging(args.log_level or default_log_level or "info")
    launch = None
    try:
        workers, prefill, decode = args.worker, args.prefill, args.decode
        if args.launch is not None:
            if workers or prefill or decode:
                raise ValueError("--launch starts its own workers; leave out --worker/--prefill/--decode")
            if args.worker_gpus == "auto":
                gpus = visible_gpus()
            else:  # share: none to split, every worker sees the router's GPUs
                gpus = [] if args.worker_gpus == "share" else _csv(args.worker_gpus)
            children = plan_children(parse_launch(args.launch), ["--model", args.model, *rest], gpus)
            launch = LaunchPlan(children=tuple(children), ready_timeout=args.launch_timeout,
                                stop_timeout=args.worker_stop_timeout)
            workers = [c.url for c in children if c.role == "both"]
            prefill = [c.url for c in children if c.role == "prefill"]
            decode = [c.url for c in children if c.role == "decode"]
        settings = RouterSettings(
            host=args.host, port=args.port, workers=tuple(workers), prefill=tuple(prefill), decode=tuple(decode),
            policy=PolicyConfig(cache_threshold=args.cache_threshold, balance_abs=args.balance_abs_threshold,
                                balance_rel=args.balance_rel_threshold, max_tree_chars=args.max_tree_chars),
            health_interval=args.health_interval, health_timeout=args.health_timeout,
            connect_timeout=args.connect_timeout, scrape_timeout=args.scrape_timeout,
            max_request_body=args.max_request_body, shutdown_timeout=args.shutdown_timeout,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(run_router(settings, launch))
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"conveyor router: error: {e}", file=sys.stderr)
        return 2
