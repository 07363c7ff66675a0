"""The engine pipeline, the async API, the sync LLM facade, the server and the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.runtime.async_engine import AsyncEngine
    from conveyor.runtime.engine.config import ConfigError, EngineConfig
    from conveyor.runtime.engine.outputs import RequestOutput
    from conveyor.runtime.llm import LLM
    from conveyor.scheduler import InvalidRequestError, SamplingParams

__all__ = ["AsyncEngine", "ConfigError", "EngineConfig", "InvalidRequestError", "LLM", "RequestOutput", "SamplingParams"]

# Every name is imported when first asked for: importing this package must stay cheap, because
# `python -m conveyor` runs it before the CLI can install its SIGTERM handler, and torch takes
# over a second to import.
_WHERE = {
    "AsyncEngine": "conveyor.runtime.async_engine", "ConfigError": "conveyor.runtime.engine.config",
    "EngineConfig": "conveyor.runtime.engine.config", "LLM": "conveyor.runtime.llm",
    "RequestOutput": "conveyor.runtime.engine.outputs", "InvalidRequestError": "conveyor.scheduler",
    "SamplingParams": "conveyor.scheduler",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
