"""The router's settings: where it listens, which workers it fronts, how it checks and routes."""

from __future__ import annotations

import msgspec

from conveyor.runtime.router.policy import PolicyConfig
from conveyor.runtime.router.workers import normalize_url


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    workers: tuple[str, ...] = ()  # plain replicas (--role both)
    prefill: tuple[str, ...] = ()  # PD: prefill workers ...
    decode: tuple[str, ...] = ()  # ... and decode workers; both or neither
    policy: PolicyConfig = PolicyConfig()
    health_interval: float = 2.0  # seconds between health rounds
    health_timeout: float = 2.0  # bound on one /health answer
    connect_timeout: float = 5.0  # bound on connecting to a worker (a refused connection fails at once)
    scrape_timeout: float = 2.0  # bound on one worker's /metrics during the router's scrape
    max_request_body: int = 4 << 20  # the workers' default limit; the router reads bodies to route them
    body_timeout: float = 30.0  # seconds to receive a request body
    retry_after_s: int = 1  # Retry-After on the router's own 503s
    shutdown_timeout: float = 30.0  # seconds relayed requests get to finish on SIGINT/SIGTERM

    def __post_init__(self) -> None:
        if self.workers and (self.prefill or self.decode):
            raise ValueError("--worker fronts plain replicas; use it without --prefill/--decode")
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("PD mode needs both --prefill and --decode workers")
        if not (self.workers or self.prefill):
            raise ValueError("no workers: give --worker URL,..., or --prefill URL,... --decode URL,..., or --launch")
        urls = [normalize_url(u) for u in (*self.workers, *self.prefill, *self.decode)]
        if len(set(urls)) != len(urls):
            raise ValueError(f"a worker URL is listed twice: {sorted(u for u in urls if urls.count(u) > 1)[0]}")
        for name in ("health_interval", "health_timeout", "connect_timeout", "scrape_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_request_body < 1:
            raise ValueError("max_request_body must be >= 1")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")

    @property
    def pd(self) -> bool:
        return bool(self.prefill)
