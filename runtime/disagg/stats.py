"""Transfer counters both roles keep (read by /metrics from another thread: plain numbers only)."""

from __future__ import annotations

from dataclasses import dataclass, field

RESULTS = ("ok", "error", "aborted", "expired", "peer_dead", "rejected")


@dataclass
class TransferStats:
    results: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    bytes: int = 0  # KV bytes written (P) or received (D)
    seconds: float = 0.0  # P: first WRITE posted -> last one done; D: /kv/ready sent -> room:done
    quarantine_seconds: float = 0.0  # D: time pages spent quarantined, summed over rooms

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1
