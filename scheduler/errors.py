"""Errors a client can cause: each names the field at fault, and none of them stops the engine."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
