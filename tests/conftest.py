from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under its CPU interpreter (tests/test_triton_kernels.py). Triton
# reads the flag as each @triton.jit runs, so it is set before model.triton_kernels can be imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conveyor.memory.device import kv_bytes_per_token
from conveyor.model import resolve_model
from conveyor.model.default_model import default_model_dir
from conveyor.model.presets import preset


def save_random_hf_model(name: str, out: Path, seed: int = 0, std: float = 0.1) -> Path:
    """A tiny HF model with random weights saved as safetensors: the oracle and our engine load the same file.

    Weights are wider than HF's default init (std 0.02) so greedy argmaxes are not near-ties.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**preset(name))
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    hf.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_hf_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_hf_model("tiny-qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def default_dir() -> Path:
    return default_model_dir()


def save_tiny_chat_model(out: Path, default_dir: Path, hidden: int = 64, heads: int = 4) -> Path:
    """A tiny random Llama that speaks through SmolLM2's tokenizer and chat template (fast, has text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, tie_word_embeddings=True,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_dir / f).exists():
            shutil.copy(default_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory, default_dir: Path) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), default_dir)


def kv_bytes_for_pages(model: str, pages: int, block_size: int = 16) -> int:
    """The --kv-cache-memory that gives exactly ``pages`` usable pages (plus the reserved page 0)."""
    cfg = resolve_model(model).config
    return (pages + 1) * block_size * kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)


@pytest.fixture(scope="session")
def default_llm():
    from conveyor.runtime import LLM

    return LLM("default")
