"""The workers behind the router: what it knows of each (health, role, in-flight requests).

The router's own accounting is the load signal: ``in_flight`` counts the requests it has sent a
worker and not yet seen end (sgl-router's running queue). It is exact for what passes through
this router and needs no scrape. Health comes from ``health.py`` and from failed connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conveyor.runtime.router.prefix_tree import PrefixTree

Role = Literal["both", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("both", "prefill", "decode")


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("a worker URL is empty")
    return url if "://" in url else f"http://{url}"


@dataclass(eq=False)
class Worker:
    url: str
    role: Role  # the role it was registered for; /health must report the same
    tree: PrefixTree
    healthy: bool = False  # until the first health check says otherwise
    reason: str = "not checked yet"  # why it is unhealthy (or "ok")
    in_flight: int = 0
    served: int = 0  # requests sent to it since start

    def mark_healthy(self) -> bool:
        """True when this changed the state."""
        changed = not self.healthy
        self.healthy, self.reason = True, "ok"
        return changed

    def mark_unhealthy(self, reason: str) -> bool:
        changed = self.healthy
        if changed:
            # What it had cached may be gone (a restart); forgetting costs a miss, never a wrong token.
            self.tree.clear()
        self.healthy, self.reason = False, reason
        return changed


@dataclass
class WorkerPool:
    """The workers of one role (``both`` for plain replicas)."""

    role: Role
    workers: list[Worker] = field(default_factory=list)

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def by_url(self, url: str) -> Worker | None:
        return next((w for w in self.workers if w.url == url), None)
