"""Weights into a DecoderModel: from HF-named tensors (safetensors, converted GGUF) or random ("dummy")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from conveyor.model.config import ModelConfig
from conveyor.model.decoder import DecoderModel
from conveyor.model.parallel import Sharding, take


class WeightsError(ValueError):
    pass


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF name inside a layer -> (our parameter, which part of a fused parameter)
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", "q"),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", "k"),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", "v"),
    "self_attn.q_proj.bias": ("self_attn.qkv_proj.bias", "q"),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj.bias", "k"),
    "self_attn.v_proj.bias": ("self_attn.qkv_proj.bias", "v"),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> DecoderModel:
    with torch.device("meta"):
        model = DecoderModel(cfg)
    return model.to_empty(device=device).to(dtype).eval().requires_grad_(False)


def load_hf_tensors(model: DecoderModel, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy HF-named tensors into the model; every parameter must be written exactly once."""
    cfg = model.config
    params = dict(model.named_parameters())
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv_rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    filled: set[str] = set()
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target, rows = _target(name, qkv_rows, cfg.intermediate_size)
        if target not in params:
            raise WeightsError(f"{source}: unexpected tensor {name!r}")
        dst = params[target].data if rows is None else params[target].data[rows[0] : rows[1]]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor)
        filled.add(f"{target}[{rows}]" if rows else target)
    expected = _expected_slots(params, qkv_rows, cfg.intermediate_size)
    missing = sorted(expected - filled)
    if missing:
        raise WeightsError(f"{source}: missing weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _target(name: str, qkv_rows: dict[str, tuple[int, int]], inter: int) -> tuple[str, tuple[int, int] | None]:
    if name.startswith("model.") and not name.startswith("model.layers."):
        return name.removeprefix("model."), None
    m = _LAYER.fullmatch(name)
    if m is None:
        return name, None
    layer, rest = m.groups()
    if rest in _FUSED:
        param, part = _FUSED[rest]
        rows = qkv_rows[part] if isinstance(part, str) else (part * inter, (part + 1) * inter)
        return f"layers.{layer}.{param}", rows
    return f"layers.{layer}.{rest}", None


def _expected_slots(params: dict[str, torch.nn.Parameter], qkv_rows: dict, inter: int) -> set[str]:
    out: set[str] = set()
    for name in params:
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            out.update(f"{name}[{r}]" for r in qkv_rows.values())
        elif name.endswith("gate_up_proj.weight"):
            out.update(f"{name}[{(i * inter, (i + 1) * inter)}]" for i in range(2))
        else:
            out.add(name)
    return out


def iter_safetensors(directory: Path, sharding: Sharding | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the directory's files; with ``sharding``, only this rank's slice of each is read."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no *.safetensors files")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    span = sharding.hf_span(name) if sharding is not None else None
                    if span is None:
                        yield name, sf.get_tensor(name)
                        continue
                    sl = sf.get_slice(name)
                    part = sl[span.start:span.stop] if span.dim == 0 else sl[:, span.start:span.stop]
                    yield name, take(part, span._replace(start=0, stop=part.shape[span.dim]))
        except SafetensorError as e:
            raise WeightsError(f"{f}: corrupt safetensors file ({e})") from None


def init_dummy(model: DecoderModel, seed: int, sharding: Sharding | None = None) -> None:
    """Random weights of the exact shapes, reproducible from the seed; norms start at one.

    With ``sharding`` each full tensor is drawn as an unsharded model would draw it and this rank
    keeps its slice, so every tensor-parallel size computes the same model.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    full_shapes = {}
    if sharding is not None:
        with torch.device("meta"):
            full_shapes = {n: p.shape for n, p in DecoderModel(sharding.cfg).named_parameters()}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif sharding is None:
            p.data.normal_(0.0, 0.02, generator=gen)
        else:
            full = torch.empty(full_shapes[name], dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=gen)
            p.data.copy_(sharding.slice_fused(name, full))
