"""``conveyor`` (and ``python -m conveyor``): generate, chat; engine flags follow vLLM's names."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from conveyor.runtime.engine_args import add_engine_args, engine_config, parse_bytes
from conveyor.runtime.logging import LEVELS, configure_logging


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument("--top-p", type=float, default=0.95)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", dest="sample_seed", type=int, default=None, help="per-request sampling seed")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from conveyor.scheduler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sample_seed, stop=args.stop,
    )


async def _generate(args: argparse.Namespace) -> int:
    from conveyor.runtime.async_engine import AsyncEngine

    engine = await AsyncEngine.create(engine_config(args))
    try:
        messages = [{"role": "user", "content": args.prompt}] if args.chat_template else None
        prompt = None if messages else args.prompt
        async for out in engine.generate(prompt, sampling_params(args), messages=messages):
            print(out.text, end="", flush=True)
        print()
    finally:
        await engine.shutdown()
    return 0


async def _chat(args: argparse.Namespace) -> int:
    from conveyor.runtime.async_engine import AsyncEngine

    engine = await AsyncEngine.create(engine_config(args))
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"Chatting with {engine.model_name}. Empty line or Ctrl-D to quit, /reset to forget.", file=sys.stderr)
    try:
        while True:
            try:
                line = await asyncio.to_thread(input, "> ")
            except EOFError:
                break
            if not line.strip():
                break
            if line.strip() == "/reset":
                del history[1 if args.system else 0 :]
                continue
            history.append({"role": "user", "content": line})
            reply = []
            async for out in engine.generate(messages=history, params=sampling_params(args)):
                print(out.text, end="", flush=True)
                reply.append(out.text)
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        await engine.shutdown()
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from conveyor.runtime.server.app import ServerSettings
    from conveyor.runtime.server.serve import serve

    chat_template = None
    if args.chat_template is not None:  # a file, or the template itself (as vLLM takes it)
        path = Path(args.chat_template)
        chat_template = path.read_text() if path.is_file() else args.chat_template
    settings = ServerSettings(
        host=args.host, port=args.port, max_waiting_requests=args.max_waiting_requests,
        max_request_body=args.max_request_body, shutdown_timeout=args.shutdown_timeout,
        ignore_unknown_fields=args.ignore_unknown_fields, chat_template=chat_template,
        tool_call_parser=args.tool_call_parser,
        keepalive_timeout=args.keepalive_timeout, body_timeout=args.body_timeout, write_timeout=args.write_timeout,
        stall_timeout=args.stall_timeout, input_workers=args.input_workers,
        api_key=args.api_key or os.environ.get("CONVEYOR_API_KEY") or None, open_paths=tuple(args.open_paths),
        allowed_origins=tuple(args.allowed_origins), metrics_prefix=args.metrics_prefix,
        stats_interval_s=args.stats_interval,
    )
    return await serve(engine_config(args), settings)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="answer 429 while this many requests wait for the engine (default: 1024)")
    group.add_argument("--max-request-body", type=parse_bytes, default=4 << 20,
                       help="largest request body, e.g. 4MiB; larger gets 413 (default: 4MiB)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds running requests get to finish on SIGINT/SIGTERM before they are aborted "
                       "(default: 30)")
    group.add_argument("--ignore-unknown-fields", action="store_true",
                       help="accept request fields this server does not know, logging them (vLLM's behaviour); "
                       "default: 400 naming them (OpenAI's)")
    group.add_argument("--chat-template", default=None,
                       help="a Jinja chat template (file path or the template text) instead of the model's")
    group.add_argument("--tool-call-parser", default="hermes", choices=["hermes"],
                       help="how tool calls are read from the output: hermes (<tool_call>JSON</tool_call>, "
                       "Qwen/Hermes and SmolLM2; default)")
    group.add_argument("--keepalive-timeout", type=float, default=15.0,
                       help="seconds a connection may take to send a whole request, from opening or from its last "
                       "response; slow or idle ones are closed (default: 15)")
    group.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds to receive a request body once its headers are in; then 408 (default: 30)")
    group.add_argument("--write-timeout", type=float, default=30.0,
                       help="a streaming client that reads nothing for this long is cut off and its requests "
                       "aborted (default: 30)")
    group.add_argument("--stall-timeout", type=float, default=60.0,
                       help="/health answers 503 once the engine has made no progress for this long with "
                       "requests waiting (default: 60)")
    group.add_argument("--input-workers", type=int, default=2,
                       help="threads that tokenize and chat-template prompts off the event loop (default: 2)")
    group.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` (401 otherwise); default: $CONVEYOR_API_KEY, "
                       "else no auth")
    group.add_argument("--open-paths", type=_csv, default=["/health", "/metrics"],
                       help="comma-separated paths answered without the API key (default: /health,/metrics; "
                       "'' for none)")
    group.add_argument("--allowed-origins", type=_csv, default=[],
                       help="comma-separated origins allowed to call from a browser (CORS), or '*' "
                       "(default: none)")
    group.add_argument("--metrics-prefix", choices=["conveyor", "vllm"], default="conveyor",
                       help="name prefix of the series vLLM also has; vllm makes vLLM's Grafana dashboard work "
                       "unchanged (default: conveyor)")
    group.add_argument("--stats-interval", type=float, default=10.0,
                       help="seconds between engine-stats log lines (throughput, running, waiting, KV use); "
                       "0: off (default: 10)")
    # Also accepted after the subcommand; SUPPRESS keeps `conveyor --log-level X serve` working.
    group.add_argument("--log-level", default=argparse.SUPPRESS, choices=list(LEVELS),
                       help="debug adds probe/scrape access lines, idle stats lines and per-request admission "
                       "lines (default: info)")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor LLM inference runtime")
    parser.add_argument("--log-level", default=None, choices=list(LEVELS),
                        help="default: info for serve (one line per request), warning otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt and stream it to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap the prompt as a user chat message (default: on)")
    add_sampling_args(gen)
    add_engine_args(gen)

    chat = sub.add_parser("chat", help="interactive streaming chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat)
    add_engine_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    add_server_args(serve)
    add_engine_args(serve)

    # The load generator has its own parser: prefix "+" makes this one pass every "--flag" through.
    loadgen = sub.add_parser("loadgen", help="streaming load against an OpenAI-compatible server (see loadgen -h)",
                             add_help=False, prefix_chars="+")
    loadgen.add_argument("args", nargs=argparse.REMAINDER)
    compare = sub.add_parser("compare", help="fifo vs static vs continuous batching, overlap off and on (see compare -h)",
                             add_help=False, prefix_chars="+")
    compare.add_argument("args", nargs=argparse.REMAINDER)
    simulate = sub.add_parser("simulate", help="compare scheduling policies with simulated time (see simulate -h)",
                              add_help=False, prefix_chars="+")
    simulate.add_argument("args", nargs=argparse.REMAINDER)
    router = sub.add_parser("router", help="one OpenAI endpoint in front of replicas or prefill/decode workers; "
                            "--launch starts them (see router -h)", add_help=False, prefix_chars="+")
    router.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "router") and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # The `conveyor` script's own window (python -m runtime installs this earlier, in __main__):
        # until the server's handlers are in, SIGTERM is a clean exit, not -15.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    configure_logging(args.log_level or ("info" if args.command in ("serve", "router") else "warning"))
    # Tools with parsers of their own: each takes the rest of the command line.
    if args.command == "loadgen":  # a client: runs its own event loop, holds no engine
        from conveyor.runtime.tools.loadgen import main as loadgen_main

        return loadgen_main(args.args)
    if args.command == "compare":
        from conveyor.runtime.tools.compare import main as compare_main

        return compare_main(args.args)
    if args.command == "router":  # a proxy: no engine, no torch
        from conveyor.runtime.router.cli import main as router_main

        return router_main(args.args, args.log_level)
    if args.command == "simulate":
        from conveyor.runtime.tools.simulator import main as simulate_main

        return simulate_main(args.args)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop does not exist on Windows
        runner = asyncio.run
    handlers = {"generate": _generate, "chat": _chat, "serve": _serve}
    try:
        return runner(handlers[args.command](args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:  # config, model and request errors: say what, no trace
        print(f"conveyor: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
