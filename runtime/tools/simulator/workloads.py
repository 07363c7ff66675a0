"""Simulated workloads: the requests a run replays and the Poisson streams that make them.

Each ``SimRequest`` carries the output length at which the simulator stops it; the policy sees only the
prompt and ``max_new_tokens``, as in the engine.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Heavy tail: lognormal output lengths with mean ~250 and p99 ~2,000 (sigma 1.2, so
# mu = ln 250 - sigma^2 / 2). The prompt's task template explains part of the spread: log length =
# mu + task effect (sigma 0.96) + noise (sigma 0.72), so even a predictor that knew every task's
# effect reaches only a correlation of 0.8 with the log length (Kendall's tau ~0.59), about what
# learned predictors reach on real chat traces. The policy never sees the drawn length.
HEAVY_SIGMA = 1.2
HEAVY_MU = math.log(250) - HEAVY_SIGMA**2 / 2
TASK_SIGMA = 0.96
NOISE_SIGMA = math.sqrt(HEAVY_SIGMA**2 - TASK_SIGMA**2)
NUM_TASKS = 32
TEMPLATE_TOKENS = 8
MAX_NEW_TOKENS = 2048
WORKLOADS = ("heavy-tail", "priority", "tenants", "mixed")


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival: float  # seconds from the start
    prompt: tuple[int, ...]
    output_len: int  # where the simulator stops it; the policy never sees this
    max_new_tokens: int
    priority: int = 0
    tenant: str | None = None


def _task_effects() -> list[float]:
    """Evenly spaced normal quantiles, rescaled so their spread is exactly TASK_SIGMA."""
    raw = [statistics.NormalDist().inv_cdf((k + 0.5) / NUM_TASKS) for k in range(NUM_TASKS)]
    scale = TASK_SIGMA / statistics.pstdev(raw)
    return [x * scale for x in raw]


_TASK_EFFECTS = _task_effects()


def heavy_tail_request(rng: random.Random, request_id: str, arrival: float, priority: int = 0,
                       tenant: str | None = None) -> SimRequest:
    task = rng.randrange(NUM_TASKS)
    log_len = HEAVY_MU + _TASK_EFFECTS[task] + rng.gauss(0.0, NOISE_SIGMA)
    length = max(1, min(MAX_NEW_TOKENS, round(math.exp(log_len))))
    template = tuple(1000 + TEMPLATE_TOKENS * task + j for j in range(TEMPLATE_TOKENS))  # the task's system prompt
    body = tuple(rng.randrange(2000, 30000) for _ in range(rng.randint(16, 256)))
    return SimRequest(request_id, arrival, template + body, length, MAX_NEW_TOKENS, priority, tenant)


def mixed_request(rng: random.Random, request_id: str, arrival: float, priority: int = 0,
                  tenant: str | None = None) -> SimRequest:
    """The offline benchmark's mix: prompt and output lengths uniform in [100, 1024]."""
    prompt = tuple(rng.randrange(2000, 30000) for _ in range(rng.randint(100, 1024)))
    return SimRequest(request_id, arrival, prompt, rng.randint(100, 1024), 1024, priority, tenant)


class Stream(NamedTuple):
    """One Poisson source: ``rate`` requests/s (``inf``: all at t=0), ``n`` of them."""

    rate: float
    n: int
    priority: int = 0
    tenant: str | None = None
    make: Callable[..., SimRequest] = heavy_tail_request


def merge_streams(streams: Sequence[Stream], seed: int = 0) -> list[SimRequest]:
    """Each stream draws from its own seeded generator, so adding a stream leaves the others as they were."""
    out: list[SimRequest] = []
    for k, st in enumerate(streams):
        rng = random.Random(f"{seed}:{k}")
        t = 0.0
        for i in range(st.n):
            if not math.isinf(st.rate):
                t += rng.expovariate(st.rate)
            out.append(st.make(rng, f"{k}-{i}", t, st.priority, st.tenant))
    return sorted(out, key=lambda r: r.arrival)


def make_workload(kind: str, n: int, rate: float, seed: int = 0) -> list[SimRequest]:
    """``rate`` is the total arrival rate; ``inf`` sends everything at t=0."""
    if kind == "heavy-tail":
        return merge_streams([Stream(rate, n)], seed)
    if kind == "priority":  # a fifth of the requests urgent (priority 0; lower is more urgent)
        return merge_streams([Stream(rate * 0.2, n // 5, 0), Stream(rate * 0.8, n - n // 5, 1)], seed)
    if kind == "tenants":  # tenant A at 4x tenant B's rate
        return merge_streams([Stream(rate * 0.8, n - n // 5, tenant="A"), Stream(rate * 0.2, n // 5, tenant="B")],
                             seed)
    if kind == "mixed":
        return merge_streams([Stream(rate, n, make=mixed_request)], seed)
    raise ValueError(f"unknown workload {kind!r}: expected one of {', '.join(WORKLOADS)}")
