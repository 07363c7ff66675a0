from conveyor.runtime.engine.detokenizer import IncrementalDetokenizer
from conveyor.scheduler import SamplingParams


def stream(tok, ids, **params):
    d = IncrementalDetokenizer(tok, SamplingParams(**params))
    pieces, stop = [], None
    for i in ids:
        stop = d.add(i)
        pieces.append(d.take_new_text(final=stop is not None))
        if stop is not None:
            break
    return pieces, stop


def test_streamed_text_equals_decode_and_never_splits_a_character(default_llm):
    tok = default_llm.core.tokenizer
    text = "Größe 🙂 naïve café — 東京"
    ids = tok.encode(text)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed(default_llm):
    tok = default_llm.core.tokenizer
    ids = tok.encode("The answer is forty-two. The end")
    pieces, stop = stream(tok, ids, stop=["forty-two"])
    assert stop == "forty-two"
    assert "".join(pieces) == "The answer is "
    # The held-back prefix "fort..." was never sent on its own.
    assert not any("fort" in p for p in pieces)


def test_a_partial_stop_match_is_released_when_it_stops_matching(default_llm):
    tok = default_llm.core.tokenizer
    ids = tok.encode("forty apples and forty-two")
    pieces, stop = stream(tok, ids, stop=["forty-two"])
    assert stop == "forty-two"
    assert "".join(pieces) == "forty apples and "


def test_include_stop_str_in_output(default_llm):
    tok = default_llm.core.tokenizer
    pieces, _ = stream(tok, tok.encode("a b STOP c"), stop=["STOP"], include_stop_str_in_output=True)
    assert "".join(pieces) == "a b STOP"
