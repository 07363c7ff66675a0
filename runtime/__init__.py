"""The engine pipeline, the async API, the sync LLM facade, the server and the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.async_engine import AsyncEngine
    from runtime.config import ConfigError, EngineConfig
    from runtime.llm import LLM
    from runtime.outputs import RequestOutput
    from scheduler import InvalidRequestError, SamplingParams

__all__ = ["AsyncEngine", "ConfigError", "EngineConfig", "InvalidRequestError", "LLM", "RequestOutput", "SamplingParams"]

# Every name is imported when first asked for: importing this package must stay cheap, because
# `python -m runtime` runs it before __main__ can install its SIGTERM handler, and torch takes
# over a second to import.
_WHERE = {
    "AsyncEngine": "runtime.async_engine", "ConfigError": "runtime.config", "EngineConfig": "runtime.config",
    "LLM": "runtime.llm", "RequestOutput": "runtime.outputs", "InvalidRequestError": "scheduler",
    "SamplingParams": "scheduler",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
