"""Stop strings: the automaton agrees with a brute-force search, and the detokenizer feeds it only
new text, so a request's stops cost the same per token however many and long they are."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.runtime.engine.detokenizer import IncrementalDetokenizer
from conveyor.runtime.engine.stop_matcher import StopMatcher
from conveyor.scheduler import SamplingParams
from conveyor.scheduler.params import MAX_STOP_CHARS, MAX_STOP_STRINGS

alphabet = st.sampled_from("abc")
stops_st = st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1, max_size=5, unique=True)


def brute_first_stop(stops: list[str], text: str) -> tuple[int, str] | None:
    """The earliest end of any stop in ``text``; at that end, the longest stop."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return end, max(hits, key=len)
    return None


def brute_held_back(stops: list[str], text: str) -> int:
    return max((k for k in range(1, len(text) + 1) for s in stops if k < len(s) and s.startswith(text[-k:])),
               default=0)


@settings(max_examples=300, deadline=None)
@given(stops=stops_st, pieces=st.lists(st.text(alphabet, max_size=4), max_size=8))
def test_the_automaton_finds_what_brute_force_finds(stops: list[str], pieces: list[str]) -> None:
    m = StopMatcher(tuple(stops))
    state, seen, found = 0, "", None
    for piece in pieces:
        state, end, i = m.feed(state, piece)
        if i >= 0:
            found = (len(seen) + end, stops[i])
            seen += piece
            break
        seen += piece
        assert m.depth[state] == brute_held_back(stops, seen)
    text = "".join(pieces)
    expected = brute_first_stop(stops, text)
    assert found == expected


@pytest.fixture(scope="module")
def tokenizer():
    from conveyor.model.default_model import default_model_dir
    from conveyor.model.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir())


def test_the_detokenizer_feeds_each_character_once_whatever_the_stops(tokenizer, monkeypatch) -> None:
    """The issue: every stop was searched for after every token (1,000 x 1,000 chars slowed everyone 21x)."""
    stops = [f"{i:03d}" + "q" * (MAX_STOP_CHARS - 3) for i in range(MAX_STOP_STRINGS)]
    fed: list[int] = []
    real_feed = StopMatcher.feed

    def feed(self, state, text):
        fed.append(len(text))
        return real_feed(self, state, text)

    monkeypatch.setattr(StopMatcher, "feed", feed)
    d = IncrementalDetokenizer(tokenizer, SamplingParams(stop=stops))
    ids = tokenizer.encode("Once upon a time, in a forest far away, there lived a fox. " * 8)
    sent = ""
    for t in ids:
        assert d.add(t) is None
        sent += d.take_new_text(final=False)
    assert sum(fed) == len(d.text)  # only new characters, never the text again
    assert sent == d.text  # nothing held back: no tail is a prefix of these stops
