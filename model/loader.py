"""Resolve ``--model`` (default, preset, HF directory, GGUF file) and build the model on a device."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from conveyor.model.config import ModelConfig
from conveyor.model.decoder import DecoderModel
from conveyor.model.default_model import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME, cache_root, default_model_dir
from conveyor.model.gguf_convert import convert_gguf
from conveyor.model.parallel import Sharding, TensorParallel
from conveyor.model.presets import PRESETS
from conveyor.model.weights import WeightsError, empty_model, init_dummy, iter_safetensors, load_hf_tensors


class ModelNotFoundError(FileNotFoundError):
    pass


class ModelSource(NamedTuple):
    name: str  # what /v1/models reports
    hf_config: dict[str, Any]
    weights_dir: Path | None  # None: dummy weights
    tokenizer_dir: Path | None

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)


def resolve_model(spec: str, load_format: str = "auto") -> ModelSource:
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    if spec in DEFAULT_MODEL_ALIASES:
        return _from_dir(default_model_dir(), DEFAULT_MODEL_NAME, load_format)
    if spec in PRESETS:
        return ModelSource(spec, dict(PRESETS[spec]), None, None)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"--model {spec!r}: directory has no config.json")
        return _from_dir(path, path.name, load_format)
    if path.is_file() and path.suffix == ".gguf":
        return _from_dir(_converted_gguf(path), path.stem, load_format)
    raise ModelNotFoundError(
        f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), 'default', "
        "a directory with config.json, or a .gguf file"
    )


def _from_dir(path: Path, name: str, load_format: str) -> ModelSource:
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    has_tok = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    gen = path / "generation_config.json"
    if gen.exists():  # generation_config's eos list (e.g. Llama 3's eot ids) wins over config.json's
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            hf["eos_token_id"] = eos
    return ModelSource(name, hf, None if load_format == "dummy" else path, path if has_tok else None)


def _converted_gguf(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "converted" / f"{path.stem}-{key}"
    if not (out / "config.json").exists():
        convert_gguf(path, out)
    return out


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
               tp: TensorParallel | None = None) -> DecoderModel:
    """The model on ``device``; with ``tp``, only rank ``tp.rank``'s shard of it (local sizes in its config)."""
    sharding = Sharding(source.config, tp.rank, tp.size) if tp is not None else None
    model = empty_model(source.config if sharding is None else sharding.local_config(), dtype, device)
    if source.weights_dir is None:
        init_dummy(model, seed, sharding)
    else:
        load_hf_tensors(model, iter_safetensors(source.weights_dir, sharding), str(source.weights_dir))
    model.tp = tp
    return model
