"""Penalties and logprobs, computed on the device from the token pool."""

from __future__ import annotations

import math

import torch

from conveyor.model.sampling import Penalties, apply_penalties
from conveyor.runtime import LLM, SamplingParams
from tests.test_oracle import mixed_prompts


def naive_penalties(logits, history, prompt_len, presence, frequency, repetition):
    out = logits.clone()
    outputs = history[prompt_len:]
    for tok in set(history):
        out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    for tok in set(outputs):
        out[tok] -= frequency * outputs.count(tok) + presence
    return out


def test_apply_penalties_matches_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    histories = [[1, 2, 3, 3, 7, 7, 7], [4, 4, 9], [5]]
    prompt_lens = [3, 1, 1]
    pres, freq, rep = [0.5, -0.3, 0.0], [0.2, 1.0, 0.0], [1.3, 0.8, 1.0]
    width = max(map(len, histories))
    hist = torch.full((3, width + 2), -1, dtype=torch.int32)  # -1: poison past each row's length
    for i, h in enumerate(histories):
        hist[i, : len(h)] = torch.tensor(h)
    got = apply_penalties(logits, Penalties(
        presence=torch.tensor(pres), frequency=torch.tensor(freq), repetition=torch.tensor(rep), history=hist,
        prompt_lens=torch.tensor(prompt_lens), lengths=torch.tensor([len(h) for h in histories])))
    for i in range(3):
        want = naive_penalties(logits[i], histories[i], prompt_lens[i], pres[i], freq[i], rep[i])
        assert torch.allclose(got[i], want, atol=1e-6)


def test_repetition_penalty_matches_hf_greedy(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    prompts = mixed_prompts(8, 512, seed=3)
    llm = LLM(str(tiny_llama_dir), max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                repetition_penalty=1.5), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                          eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in plain] != [o.token_ids for o in outs]  # the penalty did something


def test_frequency_penalty_breaks_repetition(tiny_chat_dir):
    llm = LLM(str(tiny_chat_dir))
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = llm.generate(["la la la"], p, use_tqdm=False)[0].token_ids
    penalised = llm.generate(["la la la"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                          frequency_penalty=2.0), use_tqdm=False)[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_logprobs_are_the_models_distribution(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    prompt = [5, 17, 42, 99, 3]
    llm = LLM(str(tiny_llama_dir))
    req = llm.core.inputs.make_request(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                 logprobs=3))
    llm.core.add_request(req)
    outs = []
    while llm.core.has_work():
        outs += llm.core.step()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt + req.output_token_ids])
    ref = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    for step, out in enumerate(outs):
        (lp,) = out.logprobs
        assert lp.token_id == out.token_ids[0]
        assert math.isclose(lp.logprob, ref[step, lp.token_id].item(), abs_tol=1e-4)
        assert [t.token_id for t in lp.top] == ref[step].topk(3).indices.tolist()
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
    llm.core.check_integrity()


def test_logprobs_zero_gives_only_the_sampled_token(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir))
    req = llm.core.inputs.make_request([1, 2, 3], SamplingParams(max_tokens=2, logprobs=0, seed=1))
    llm.core.add_request(req)
    outs = [o for _ in range(10) for o in llm.core.step()]
    assert all(o.logprobs and o.logprobs[0].top == [] and o.logprobs[0].logprob <= 0 for o in outs)


def test_penalties_and_logprobs_agree_across_pipeline_depths(tiny_chat_dir):
    """Penalties read the token pool on the device, so batch N+1 sees batch N's token even though
    the host has not: depth 2 must give exactly what depth 1 gives."""
    prompts = ["la la la", "one two three", "the the the the"]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=1.0, logprobs=2),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=1.5,
                             repetition_penalty=1.3, logprobs=0),
              SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True, repetition_penalty=1.5)]
    runs = {}
    for depth in (1, 2):
        llm = LLM(str(tiny_chat_dir), pipeline_depth=depth)
        core = llm.core
        reqs = [core.inputs.make_request(core.inputs.token_ids(p), sp) for p, sp in zip(prompts, params)]
        streams: dict[str, list] = {r.request_id: [] for r in reqs}
        for r in reqs:
            core.add_request(r)
        while core.has_work():
            for out in core.step():
                streams[out.request_id].append(out)
        runs[depth] = [[(o.token_ids, o.logprobs) for o in streams[r.request_id]] for r in reqs]
        core.check_integrity()
        llm.close()
    assert runs[1] == runs[2]
    assert runs[1][0][0][1] is not None and len(runs[1][0][0][1][0].top) == 2
