"""GGUF file -> HF-style directory (config.json, model.safetensors, tokenizer), dequantised with `gguf`.

Converting once and loading the directory afterwards is what makes the second start take seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from conveyor.model.weights import WeightsError

# GGUF architecture -> (HF model_type, metadata prefix). Mistral GGUFs say "llama".
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write the converted model to ``out_dir`` atomically (a half-written cache is never seen)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises ValueError, struct errors, or numpy errors on bad files
        raise WeightsError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    hf_config = _hf_config(reader, gguf_path)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        name = _hf_name(t.name, gguf_path)
        if hf_config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf_config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            arr = _unpermute_rope(arr, heads)
        tensors[name] = torch.from_numpy(arr)
    hf_config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        _save_tokenizer(gguf_path, tmp)
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary halves; HF (and we) keep them split.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(name: str, path: Path) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    m = _BLOCK.fullmatch(name)
    if m is None or m.group(2) not in _NAMES:
        raise WeightsError(f"{path}: unsupported GGUF tensor {name!r}")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_NAMES[part]}.{kind}"


def _hf_config(reader: Any, path: Path) -> dict[str, Any]:
    def field(key: str, default: Any = None) -> Any:
        f = reader.get_field(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _ARCHS:
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(_ARCHS)})")
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    vocab = field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens", []))
    key_len = field(f"{arch}.attention.key_length")
    return {
        "model_type": _ARCHS[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(key_len) if key_len else hidden // heads,
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 4096)),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
