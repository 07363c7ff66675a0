"""Structured outputs, logit_bias and min_tokens in the engine: honoured, and identical at depths 1, 2, 3.

The grammar rows' masks are filled after launch (runtime/worker/grammar_mask.py); these tests pin
that down on the CPU path with the token pool poisoned, preemption, aborts and late finishes.
"""

from __future__ import annotations

import json
import re

import pytest

from conveyor.runtime import SamplingParams
from conveyor.scheduler import StructuredSpec
from tests.test_pipeline import drive, make_core, tokens

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["city", "ok", "tags", "note"],
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("CONVEYOR_DEBUG_POISON", "1")


def _valid(kind: str, text: str) -> bool:
    if kind == "json_schema":
        obj = json.loads(text)
        return (set(obj) == set(SCHEMA["properties"]) and obj["city"] in ("Paris", "London", "Rome")
                and isinstance(obj["ok"], bool) and len(obj["tags"]) <= 3 and len(obj["note"]) <= 6)
    if kind == "json_object":
        return isinstance(json.loads(text), dict)
    if kind == "regex":
        return re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) is not None
    return text in ("yes", "no", "maybe")


SPECS = {
    "json_schema": StructuredSpec(kind="json_schema", value=json.dumps(SCHEMA)),
    "json_object": StructuredSpec(kind="json_object"),
    "regex": StructuredSpec(kind="regex", value=r"[0-9]{3}-[a-z]{2}"),
    "choice": StructuredSpec(kind="choice", value=json.dumps(["yes", "no", "maybe"])),
}


def _workload():
    reqs = []
    for i in range(16):
        kind = list(SPECS)[i % 4] if i % 5 != 4 else None
        prompt = [(i * 37 + j * 11) % 40000 + 5 for j in range(3 + (i * 7) % 40)]
        sampled = dict(temperature=0.9, seed=i) if i % 2 else dict(temperature=0)
        params = SamplingParams(max_tokens=60, structured=SPECS[kind] if kind else None, **sampled)
        reqs.append((f"{kind}-{i}", prompt, params))
    return reqs


@pytest.mark.parametrize("parallel_fill_rows", [1000, 2])  # serial fill, and xgrammar's thread pool
def test_structured_outputs_match_their_grammar_and_agree_across_depths(tiny_chat_dir, monkeypatch,
                                                                        parallel_fill_rows):
    monkeypatch.setattr("conveyor.runtime.worker.grammar_mask.PARALLEL_FILL_ROWS", parallel_fill_rows)
    reqs = _workload()
    results = {}
    for depth in (1, 2, 3):
        core = make_core(tiny_chat_dir, depth)
        results[depth] = drive(core, reqs, {3: ["regex-2"]})
        assert core.scheduler.num_preemptions > 0, "the workload must exercise preemption"
        assert core.grammar_mask_batches > 0
        core.close()
    finished_valid = 0
    for rid, _, params in reqs:
        ref = results[1][rid]
        if rid == "regex-2":  # aborted at a step: how far it got depends on the depth
            assert all(results[d][rid][-1].finish_reason == "abort" for d in (1, 2, 3))
            continue
        for depth in (2, 3):
            assert tokens(results[depth][rid]) == tokens(ref), f"{rid} at depth {depth}"
            assert results[depth][rid][-1].finish_reason == ref[-1].finish_reason
        if params.structured is not None and ref[-1].finish_reason == "stop":
            text = "".join(o.text for o in ref)
            assert _valid(params.structured.kind, text), f"{rid}: {text!r}"
            finished_valid += 1
    assert finished_valid >= 8, "most constrained requests must finish inside max_tokens"


def test_logit_bias_and_min_tokens_at_depths_1_and_2(tiny_chat_dir):
    prompt = [5, 6, 7, 8]
    seeded = dict(temperature=1.0, seed=1, max_tokens=8)  # the random model repeats itself when greedy
    free = tokens(drive(make_core(tiny_chat_dir, 1), [("f", prompt, SamplingParams(**seeded))])["f"])
    banned, forced = free[0], 1234
    j = next(k for k in range(1, len(free)) if free[k] not in free[:k])  # a stop that ends it early
    stop = free[j]
    reqs = [
        ("ban", prompt, SamplingParams(**seeded, logit_bias={banned: -100})),
        ("force", prompt, SamplingParams(temperature=0.7, seed=3, max_tokens=8, logit_bias={forced: 100})),
        # Stopping on a free-run token: min_tokens holds the stop back until 5 tokens are out.
        ("min", prompt, SamplingParams(**seeded, min_tokens=j + 2, stop_token_ids=[stop])),
        ("nomin", prompt, SamplingParams(**seeded, stop_token_ids=[stop])),
    ]
    results = {d: drive(make_core(tiny_chat_dir, d), reqs) for d in (1, 2)}
    for rid, _, _ in reqs:
        assert tokens(results[1][rid]) == tokens(results[2][rid]), rid
    out = {rid: tokens(results[1][rid]) for rid, _, _ in reqs}
    assert banned not in out["ban"]
    assert out["force"] == [forced] * 8
    assert out["nomin"] == free[: j + 1]
    assert len(out["min"]) >= j + 2 and stop not in out["min"][: j + 1]


def test_bad_grammar_is_an_invalid_request_naming_the_field(tiny_chat_dir):
    from conveyor.scheduler import InvalidRequestError

    core = make_core(tiny_chat_dir, 2)
    bad = StructuredSpec(kind="regex", value="([a-z", field="structured_outputs.regex")
    with pytest.raises(InvalidRequestError) as e:
        core.inputs.make_request([5, 6], SamplingParams(structured=bad))
    assert e.value.field == "structured_outputs.regex"
    core.close()


def test_prompt_logprobs_match_a_full_forward_through_chunks_and_depths(tiny_chat_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [(j * 131) % 40000 + 5 for j in range(70)]  # chunked: the batch budget is 48 tokens
    twice = [("a", prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)),
             ("b", prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0))]  # no cache hit
    got = {}
    for depth in (1, 2):
        streams = drive(make_core(tiny_chat_dir, depth, pages=64), twice)
        got[depth] = {rid: streams[rid][0].prompt_logprobs for rid in ("a", "b")}
        assert all(o.prompt_logprobs is None for rid in ("a", "b") for o in streams[rid][1:])
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_chat_dir)).float().eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    for depth in (1, 2):
        a, b = got[depth]["a"], got[depth]["b"]
        assert a[0] is None and len(a) == len(prompt) and len(b[1].top) == 0 and len(a[1].top) == 2
        for pos in range(1, len(prompt)):
            assert a[pos].token_id == prompt[pos]
            assert abs(a[pos].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
            assert abs(a[pos].logprob - b[pos].logprob) < 1e-4  # two rows of one batch, not bitwise
            assert a[pos].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
