"""How many KV pages a request must find free to be admitted, and how many it takes up front.

`conservative` takes prompt + max_tokens at admission, so a running request never runs out of
pages and nothing is ever preempted; the price is a pool mostly reserved for tokens that are
never generated. `dynamic` admits on prompt + beta * max_tokens and grows on demand; when the
pool runs dry the scheduler preempts (recompute) the policy's victim.
"""

from __future__ import annotations

import math
from typing import Protocol


class ReservationPolicy(Protocol):
    name: str

    def admission_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        """Tokens whose pages must be free for the request to be admitted."""
        ...

    def upfront_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        """Tokens whose pages are allocated at admission (the rest grow on demand)."""
        ...


class ConservativeReservation:
    name = "conservative"

    def admission_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return num_tokens + max_new_tokens

    def upfront_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return num_tokens + max_new_tokens


class DynamicReservation:
    name = "dynamic"

    def __init__(self, beta: float = 0.3) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"reservation beta must be in [0, 1], got {beta}")
        self.beta = beta

    def admission_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return num_tokens + math.ceil(self.beta * max_new_tokens)

    def upfront_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return 0


def make_reservation(name: str, beta: float = 0.3) -> ReservationPolicy:
    if name == "conservative":
        return ConservativeReservation()
    if name == "dynamic":
        return DynamicReservation(beta)
    raise ValueError(f"unknown reservation policy {name!r}: expected 'conservative' or 'dynamic'")
