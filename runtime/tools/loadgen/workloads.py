"""What each request asks for: a prompt of a target token length and an exact output length.

Prompts are windows of real English text (``corpus.txt``, public-domain prose) rather than random
token ids, so any OpenAI-compatible server sees text it can tokenize. With ``--tokenizer DIR``
(the served model's tokenizer) a window is cut in that tokenizer's ids and checked by re-encoding,
so the server counts the target length; without one, one word stands in for one token and the
server-reported ``prompt_tokens`` in the result says what it really was.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.runtime.tools.loadgen.arrivals import read_length_rows

CORPUS = (Path(__file__).parent / "corpus.txt").read_text()


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    prompt_len: int  # the target, in the server's tokens when a tokenizer was given
    output_len: int  # max_tokens; exact with --ignore-eos


@dataclass(frozen=True)
class Preset:
    """A named scenario: defaults a user can still override flag by flag."""

    num_prompts: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    request_rate: str
    shared_prefix: bool = False  # rag: prompts open with one of a few shared documents


PRESETS: dict[str, Preset] = {
    # Many short turns; judged on TTFT/TPOT, so swept over rates.
    "chat": Preset(num_prompts=200, input_len=(32, 512), output_len=(16, 256), request_rate="4"),
    # Long prompts opening with one of a few shared documents (prefix caching pays), short answers.
    "rag": Preset(num_prompts=100, input_len=(1536, 4096), output_len=(16, 128), request_rate="1",
                  shared_prefix=True),
    # Offline throughput: everything at once, W1's length range.
    "batch": Preset(num_prompts=1000, input_len=(100, 1024), output_len=(100, 1024), request_rate="inf"),
}

RAG_DOCUMENTS = 4
RAG_DOCUMENT_FRACTION = 0.75  # of the shortest prompt; the rest is the per-request question


class PromptBuilder:
    """Cuts prompts of an exact token count out of the corpus."""

    def __init__(self, tokenizer: Any | None, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.units: list[Any] = tokenizer.encode(CORPUS, add_special_tokens=False) if tokenizer else CORPUS.split()

    def count(self, text: str) -> int:
        # encode() as the server calls it (special tokens included) is what the server counts
        return len(self.tokenizer.encode(text)) if self.tokenizer else len(text.split())

    def _window(self, start: int, n: int) -> str:
        units = [self.units[(start + i) % len(self.units)] for i in range(max(n, 0))]
        return self.tokenizer.decode(units) if self.tokenizer else " ".join(units)

    def text(self, n: int, prefix: str = "") -> str:
        """``prefix`` followed by corpus text, ``n`` tokens in all (re-encoded, adjusted a few times)."""
        start = self.rng.randrange(len(self.units))
        want = n - (self.count(prefix) if prefix else 0)
        text = prefix + self._window(start, want)
        # Decoding a window and encoding it again can merge or split tokens at its edges, and the
        # tokenizer may add a BOS; a few corrections converge (bounded: never loops forever).
        for _ in range(4):
            got = self.count(text)
            if got == n or want + n - got < 1:
                break
            want += n - got
            text = prefix + self._window(start, want)
        return text


def _uniform(rng: random.Random, lo_hi: tuple[int, int]) -> int:
    return rng.randint(lo_hi[0], lo_hi[1])


def random_items(builder: PromptBuilder, n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                 rng: random.Random) -> list[WorkItem]:
    items = []
    for _ in range(n):
        p, o = _uniform(rng, input_len), _uniform(rng, output_len)
        items.append(WorkItem(builder.text(p), p, o))
    return items


def shared_prefix_items(builder: PromptBuilder, n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                        rng: random.Random) -> list[WorkItem]:
    """RAG: each prompt is one of a few fixed documents, then a question that fills it to its length."""
    doc_len = int(input_len[0] * RAG_DOCUMENT_FRACTION)
    docs = [builder.text(doc_len) + "\n\nQuestion: " for _ in range(RAG_DOCUMENTS)]
    items = []
    for _ in range(n):
        p, o = _uniform(rng, input_len), _uniform(rng, output_len)
        items.append(WorkItem(builder.text(p, prefix=rng.choice(docs)), p, o))
    return items


def items_from_rows(builder: PromptBuilder, rows: list, n: int | None, rng: random.Random,
                    sample: bool) -> list[WorkItem]:
    """A length mix or a trace: ``sample`` draws ``n`` rows with replacement, else takes rows in order."""
    chosen = [rng.choice(rows) for _ in range(n)] if sample else rows[: n or len(rows)]
    return [WorkItem(builder.text(max(r.prompt_tokens, 1)), max(r.prompt_tokens, 1), max(r.output_tokens, 1))
            for r in chosen]


def load_lengths(path: Path) -> list:
    return read_length_rows(path, with_time=False)
