import pytest
import torch

from conveyor.model.sampling import SamplingBatch, sample
from conveyor.runtime import LLM, SamplingParams
from conveyor.scheduler import InvalidRequestError


def batch(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=None):
    return SamplingBatch.build(
        temperature=[temperature] * n, top_k=[top_k] * n, top_p=[top_p] * n, min_p=[min_p] * n,
        seeds=seeds or [None] * n, steps=steps or [0] * n,
    )


def draws(logits, params, n=2000):
    g = torch.Generator().manual_seed(0)
    return torch.stack([sample(logits, params, g) for _ in range(n)])


LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def test_greedy_is_argmax():
    assert sample(LOGITS, batch(1, temperature=0.0)).tolist() == [0]


def test_an_all_greedy_batch_keeps_its_rows_on_the_host():
    """Argmax needs none of them: a greedy batch built for a GPU copies nothing there (on this CPU-only
    machine a copy to "cuda" would raise)."""
    b = SamplingBatch.build([0.0, 0.0], [0, 5], [1.0, 0.9], [0.0, 0.0], [None, None], [0, 0], device="cuda")
    assert b.all_greedy and {t.device.type for t in (b.temperature, b.top_k, b.top_p, b.min_p)} == {"cpu"}
    assert sample(LOGITS.repeat(2, 1), b).tolist() == [0, 0]


def test_plain_sampling_follows_the_distribution():
    counts = torch.bincount(draws(LOGITS, batch(1)).flatten(), minlength=4).float() / 2000
    assert torch.allclose(counts, torch.tensor([0.5, 0.25, 0.15, 0.1]), atol=0.04)


def test_top_k_top_p_min_p_cut_the_tail():
    assert set(draws(LOGITS, batch(1, top_k=2)).unique().tolist()) == {0, 1}
    assert set(draws(LOGITS, batch(1, top_p=0.7)).unique().tolist()) == {0, 1}  # 0.5 + 0.25 reaches 0.7
    assert set(draws(LOGITS, batch(1, min_p=0.35)).unique().tolist()) == {0, 1}  # floor 0.175
    assert set(draws(LOGITS, batch(1, top_k=3, top_p=0.6)).unique().tolist()) == {0, 1}


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, 100)
    alone = sample(logits[1:2], batch(1, seeds=[42], steps=[5]))
    together = sample(logits, batch(3, seeds=[None, 42, 7], steps=[0, 5, 0]))
    assert together[1] == alone[0]


@pytest.mark.parametrize("field,kwargs", [
    ("max_tokens", {"max_tokens": 0}), ("temperature", {"temperature": -0.1}), ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}), ("min_p", {"min_p": 2.0}), ("top_k", {"top_k": -2}),
    ("repetition_penalty", {"repetition_penalty": 0.0}), ("logprobs", {"logprobs": 21}),
])
def test_invalid_params_name_the_field(field, kwargs):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_same_seed_same_text_different_seed_different_text(tiny_chat_dir):
    llm = LLM(str(tiny_chat_dir))
    prompt = "Once upon a time"

    def run(seed):
        return llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True),
                            use_tqdm=False)[0].token_ids

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c
    # A seeded request in a crowd samples the same tokens as alone.
    crowd = llm.generate([prompt, "Hello there", prompt],
                         [SamplingParams(temperature=1.0, max_tokens=24, seed=s, ignore_eos=True) for s in (5, 1, 9)],
                         use_tqdm=False)
    assert llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=24, seed=9, ignore_eos=True),
                        use_tqdm=False)[0].token_ids == crowd[2].token_ids
