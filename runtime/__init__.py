"""The engine pipeline, the async API, the sync LLM facade, the server and the CLI."""

from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.scheduler import InvalidRequestError, SamplingParams

__all__ = ["AsyncEngine", "ConfigError", "EngineConfig", "InvalidRequestError", "LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):  # the heavy facades import torch and the model only when asked for
    if name == "AsyncEngine":
        from conveyor.runtime.async_engine import AsyncEngine

        return AsyncEngine
    if name == "LLM":
        from conveyor.runtime.llm import LLM

        return LLM
    raise AttributeError(name)
