"""Conveyor: an LLM inference runtime whose engine overlaps CPU scheduling with GPU execution.

Everything is importable under this one name: ``conveyor.runtime`` (engine, APIs, server, CLI),
``conveyor.scheduler``, ``conveyor.memory`` and ``conveyor.model``. The names below load lazily, so
``import conveyor.scheduler`` (pure Python) never pulls in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

# A source checkout keeps the subpackages beside this folder (pyproject.toml maps them under
# ``conveyor`` when it builds a wheel); let them resolve when the tree runs uninstalled too.
_root = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "runtime").is_dir() and (_root / "runtime" / "__init__.py").is_file():
    __path__.append(str(_root))

if TYPE_CHECKING:
    from conveyor.runtime.async_engine import AsyncEngine
    from conveyor.runtime.engine.config import ConfigError, EngineConfig
    from conveyor.runtime.engine.outputs import RequestOutput
    from conveyor.runtime.llm import LLM
    from conveyor.scheduler import InvalidRequestError, SamplingParams

__all__ = ["AsyncEngine", "ConfigError", "EngineConfig", "InvalidRequestError", "LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
    import conveyor.runtime  # its own lazy table says where each name lives

    return getattr(conveyor.runtime, name)
