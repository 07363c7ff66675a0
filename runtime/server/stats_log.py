"""The periodic engine-stats line, like vLLM's "Avg prompt throughput: ... Running: ... reqs".

One structured line every ``--stats-interval`` seconds with throughput over the interval and the
engine's state now. An idle server logs it at debug, so a quiet log stays quiet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("conveyor.stats")


class StatsLogger:
    def __init__(self, engine: Any, metrics: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.metrics = metrics  # EngineMetrics: keeps the token totals
        self.clock = clock
        self._last = self._snapshot()
        self._was_busy = False

    def _snapshot(self) -> tuple[float, int, int, float, float, int, int, int]:
        s = self.engine.stats()
        return (self.clock(), self.metrics.num_prompt_tokens, self.metrics.num_generation_tokens,
                s.device_busy_s, s.device_idle_s, s.num_preemptions, s.prefill_tokens, s.prefix_hit_tokens)

    def tick(self) -> dict[str, Any]:
        """Log one line covering the time since the previous tick; returns its fields."""
        now = self._snapshot()
        t0, p0, g0, busy0, idle0, pre0, fill0, hit0 = self._last
        t1, p1, g1, busy1, idle1, pre1, fill1, hit1 = now
        self._last = now
        dt = max(t1 - t0, 1e-9)
        stats = self.engine.stats()
        device = (busy1 - busy0) + (idle1 - idle0)
        queried = (fill1 - fill0) + (hit1 - hit0)
        fields = {
            "prompt_throughput_tps": round((p1 - p0) / dt, 1),
            "generation_throughput_tps": round((g1 - g0) / dt, 1),
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_usage_pct": round(stats.kv_usage * 100, 1),
            "prefix_cache_hit_rate_pct": round((hit1 - hit0) / queried * 100, 1) if queried else 0.0,
            "device_idle_fraction": round((idle1 - idle0) / device, 3) if device else 0.0,
            "preemptions": pre1 - pre0,
            "interval_s": round(dt, 2),
        }
        busy = bool(p1 - p0 or g1 - g0 or stats.num_running or stats.num_waiting)
        (log.info if busy or self._was_busy else log.debug)("engine stats", **fields)
        self._was_busy = busy
        return fields

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.tick()
