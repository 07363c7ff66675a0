"""A tokenizer smaller than the model's vocabulary (padded vocab, or a stand-in for dummy weights)."""

from __future__ import annotations

import json

import pytest

from conveyor.runtime import LLM, SamplingParams
from conveyor.runtime.engine.config import ConfigError


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("small-tok")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(97)}}  # 100 tokens
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    return out


def test_only_ids_the_tokenizer_can_decode_are_sampled(small_tokenizer_dir):
    llm = LLM("tiny-llama", load_format="dummy", tokenizer=str(small_tokenizer_dir), max_model_len=128)
    params = SamplingParams(temperature=1.5, max_tokens=64, ignore_eos=True, seed=1)
    outs = llm.generate(["w1 w2 w3", "w5 w7"], params, use_tqdm=False)
    ids = [t for o in outs for t in o.token_ids]
    assert len(ids) == 128 and max(ids) < 100  # the model's vocabulary is 512
    assert all(o.text for o in outs)
    llm.close()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(default_dir):
    with pytest.raises(ConfigError, match="more than the model's vocabulary of 512"):
        LLM("tiny-llama", load_format="dummy", tokenizer=str(default_dir))
