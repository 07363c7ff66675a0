"""Greedy tokens must equal HF transformers' token for token (same weights, fp32 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from conveyor.runtime import LLM, SamplingParams
from tests.conftest import kv_bytes_for_pages


def hf_greedy(model_dir, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for p in prompts:
        # eos_token_id=None: generate exactly max_new tokens, as the engine does with ignore_eos.
        ids = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def mixed_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 15, 16, 17, 33, 90] + torch.randint(3, 100, (n - 7,), generator=g).tolist()
    return [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lengths]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_tiny_models_match_hf_under_chunking_and_preemption(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    prompts = mixed_prompts(16, 512, seed=1)
    max_new = 24
    # A token budget of 40 chunks every long prompt; 12 pages (192 tokens) for 16 requests of up to
    # 114 tokens each forces preemption.
    llm = LLM(str(model_dir), max_model_len=128, max_num_batched_tokens=40, max_num_seqs=16,
              kv_cache_memory=kv_bytes_for_pages(str(model_dir), 12))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True), use_tqdm=False)
    assert llm.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, max_new)
    llm.core.check_integrity()
    assert llm.core.scheduler.kv.num_available_pages == 12


@pytest.mark.slow
def test_default_model_matches_hf(default_llm, default_dir):
    tok = default_llm.core.tokenizer
    texts = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers.", "Explain gravity to a child."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for t in texts]
    outs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                                use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(default_dir, prompts, 32)
    default_llm.core.check_integrity()
