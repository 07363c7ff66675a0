"""How many KV pages a request is promised at admission, and how many it takes up front.

`conservative` takes prompt + max_tokens at admission, so a running request never runs out of
pages and nothing is ever retracted; the price is a pool mostly reserved for tokens that are
never generated. `dynamic` promises prompt + beta * max_tokens and grows on demand; when the
pool runs dry the scheduler retracts the policy's victim (recompute) and beta goes up.

Beta adapts like SGLang's new-token ratio: it decays a little every step towards what finished
requests actually used (their mean output / max_tokens over a window, never below a floor),
so admission gets bolder while nothing goes wrong, and jumps up on every retraction.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol


class ReservationPolicy(Protocol):
    name: str

    def admission_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        """Tokens whose pages a request is promised at admission."""
        ...

    def upfront_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        """Tokens whose pages are allocated at admission (the rest grow on demand)."""
        ...

    def on_step(self) -> None: ...

    def on_finish(self, num_output_tokens: int, max_new_tokens: int) -> None: ...

    def on_retract(self) -> None: ...

    @property
    def beta(self) -> float: ...


class ConservativeReservation:
    name = "conservative"
    beta = 1.0

    def admission_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return num_tokens + max_new_tokens

    def upfront_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return num_tokens + max_new_tokens

    def on_step(self) -> None:
        pass

    def on_finish(self, num_output_tokens: int, max_new_tokens: int) -> None:
        pass

    def on_retract(self) -> None:
        pass


class DynamicReservation:
    name = "dynamic"

    def __init__(self, beta: float = 0.3, min_beta: float | None = None, decay: float = 0.001,
                 retract_step: float = 0.1, window: int = 256, adapt: bool = True) -> None:
        min_beta = min(0.05, beta) if min_beta is None else min_beta
        if not 0.0 <= min_beta <= beta <= 1.0:
            raise ValueError(f"reservation beta must be in [min_beta, 1], got beta={beta}, min_beta={min_beta}")
        self.beta = beta
        self.min_beta = min_beta
        self.decay = decay  # per step
        self.retract_step = retract_step
        self.adapt = adapt
        self._ratios: deque[float] = deque(maxlen=window)
        self._ratio_sum = 0.0

    def admission_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return num_tokens + math.ceil(self.beta * max_new_tokens)

    def upfront_tokens(self, num_tokens: int, max_new_tokens: int) -> int:
        return 0

    @property
    def observed_ratio(self) -> float | None:
        """Mean of actual / max output length over the window; None before anything finished."""
        return self._ratio_sum / len(self._ratios) if self._ratios else None

    def on_step(self) -> None:
        if not self.adapt or self.observed_ratio is None:
            return
        target = max(self.min_beta, min(1.0, self.observed_ratio))
        # Down slowly (one bad guess costs a retraction), up at once (outputs got longer).
        self.beta = target if target > self.beta else max(target, self.beta - self.decay)

    def on_finish(self, num_output_tokens: int, max_new_tokens: int) -> None:
        if max_new_tokens <= 0:
            return
        if len(self._ratios) == self._ratios.maxlen:
            self._ratio_sum -= self._ratios[0]
        ratio = min(1.0, num_output_tokens / max_new_tokens)
        self._ratios.append(ratio)
        self._ratio_sum += ratio

    def on_retract(self) -> None:
        if self.adapt:
            self.beta = min(1.0, self.beta + self.retract_step)


def make_reservation(name: str, beta: float = 0.3, adapt: bool = True) -> ReservationPolicy:
    if name == "conservative":
        return ConservativeReservation()
    if name == "dynamic":
        return DynamicReservation(beta, adapt=adapt)
    raise ValueError(f"unknown reservation policy {name!r}: expected 'conservative' or 'dynamic'")
