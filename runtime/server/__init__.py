"""The OpenAI-compatible HTTP server: ``build_app(engine, settings)`` and ``serve(config, settings)``."""

from conveyor.runtime.server.app import ServerSettings, build_app

__all__ = ["ServerSettings", "build_app"]
