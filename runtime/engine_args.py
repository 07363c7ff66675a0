"""The engine flags (vLLM's names where the concept is the same) and the EngineConfig they build.

Every entry point with engine flags (the CLI, ``conveyor compare``, the simulator's real engine,
the benchmark scripts) adds them from here, so no tool imports the CLI.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import msgspec

from conveyor.runtime.engine.config import EngineConfig

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
    "fused_kernels": "CUDA: small-batch steps use our Triton kernels (skinny GEMMs, fused norm/RoPE); off: cuBLAS + FlashInfer only",
    "batch_invariant": "a request's tokens never depend on what shares its batch (slower; see the README)",
    "length_predictor_path": "sjf/srtf/adaptive: keep what the length predictor learned in this file across restarts",
    "tenant_weights": "fair: TENANT=WEIGHT,... service shares by request user (others weigh 1)",
    "tensor_parallel_size": "split the model across this many ranks (GPUs; processes on CPU), Megatron style",
    "role": "both (one process), prefill (computes prompts, pushes their KV) or decode (receives KV, decodes)",
    "kv_transport": "prefill/decode: how KV moves between the two (nixl; loopback is in-process, for tests)",
    "kv_lease_s": "decode: seconds a request waits for its prompt's KV before it fails with 503",
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
        aliases = ["-tp"] if field.name == "tensor_parallel_size" else []  # vLLM's short form
        group.add_argument(flag, *aliases, **kwargs)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = [f.name for f in msgspec.structs.fields(EngineConfig)]
    return EngineConfig(**{n: getattr(args, n) for n in names})


def parse_range(text: str) -> tuple[int, int]:
    """``--input-len`` / ``--output-len``: ``LO:HI`` (uniform) or one number, 1 <= LO <= HI."""
    lo, _, hi = text.partition(":")
    try:
        lo_hi = (int(lo), int(hi or lo))
    except ValueError:
        lo_hi = (0, 0)
    if not 1 <= lo_hi[0] <= lo_hi[1]:
        raise argparse.ArgumentTypeError(f"not a length range LO:HI with 1 <= LO <= HI: {text!r}")
    return lo_hi
