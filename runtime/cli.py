"""``conveyor`` (and ``python -m runtime``): generate, chat; engine flags follow vLLM's names."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from typing import Any, Sequence

import msgspec

from runtime.config import EngineConfig
from runtime.logging import LEVELS, configure_logging

_HELP = {
    "model": "'default' (SmolLM2-135M-Instruct), a preset, an HF directory or a .gguf file",
    "load_format": "auto, or dummy for random weights with the model's shapes",
    "kv_cache_memory": "bytes for the KV pool on CPU, e.g. 2GiB (default 1GiB)",
    "reservation": "KV reservation: conservative (prompt+max_tokens) or dynamic (grow on demand)",
    "block_size": "tokens per KV page",
    "reservation_beta": "dynamic: share of max_tokens promised at admission, to start with",
    "reservation_adapt": "dynamic: beta follows observed output lengths and rises on retraction",
    "enable_prefix_caching": "reuse KV pages of prompts seen before (radix tree, LRU eviction)",
    "preemption_mode": "when the KV pool runs dry: recompute, or swap the KV to host memory and back",
    "swap_space": "GiB of pinned host memory for swapped-out KV",
    "max_piecewise_tokens": "CUDA: prefill/mixed steps up to this many tokens replay piecewise CUDA graphs; 0: eager",
    "batch_invariant": "a request's tokens never depend on what shares its batch (slower; see the README)",
    "length_predictor_path": "sjf/srtf/adaptive: keep what the length predictor learned in this file across restarts",
    "tenant_weights": "fair: TENANT=WEIGHT,... service shares by request user (others weigh 1)",
    "tokenizer": "tokenizer directory to use instead of the model's (presets with dummy weights have none)",
}
_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_weights(text: str) -> dict[str, float]:
    """``gold=3,free=0.5`` -> {"gold": 3.0, "free": 0.5}."""
    bad = argparse.ArgumentTypeError(f"not a TENANT=WEIGHT list: {text!r} (try gold=3,free=0.5)")
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = (x.strip() for x in item.partition("="))
        if not name:
            raise bad
        try:
            out[name] = float(value)  # "gold" alone has an empty value: not a float either
        except ValueError:
            raise bad from None
    return out


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for field in msgspec.structs.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kwargs: dict[str, Any] = {"default": default, "help": _HELP.get(field.name, "") + f" (default: {default})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.name == "kv_cache_memory":
            kwargs["type"] = parse_bytes
        elif field.name == "tenant_weights":
            kwargs.update(type=parse_weights, default={}, help=_HELP[field.name])
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            kwargs["type"] = type(default)
        elif default is None:
            kwargs["type"] = str if field.name in ("served_model_name", "tokenizer", "length_predictor_path") else int
        group.add_argument(flag, **kwargs)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = [f.name for f in msgspec.structs.fields(EngineConfig)]
    return EngineConfig(**{n: getattr(args, n) for n in names})


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
    from scheduler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sample_seed, stop=args.stop,
    )


async def _generate(args: argparse.Namespace) -> int:
    from runtime.async_engine import AsyncEngine

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
    from runtime.async_engine import AsyncEngine

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
    from runtime.server.app import ServerSettings
    from runtime.server.serve import serve

    settings = ServerSettings(
        host=args.host, port=args.port, max_waiting_requests=args.max_waiting_requests,
        max_request_body=args.max_request_body, shutdown_timeout=args.shutdown_timeout,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or ("info" if args.command == "serve" else "warning"))
    # Tools with parsers of their own: each takes the rest of the command line.
    if args.command == "loadgen":  # a client: runs its own event loop, holds no engine
        from runtime.loadgen import main as loadgen_main

        return loadgen_main(args.args)
    if args.command == "compare":
        from runtime.compare import main as compare_main

        return compare_main(args.args)
    if args.command == "simulate":
        from runtime.simulator import main as simulate_main

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
