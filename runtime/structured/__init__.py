"""Structured outputs: grammars compiled per spec, matchers per request, token bitmasks per batch."""

from runtime.structured.grammar import GrammarBatch, GrammarCompiler, apply_token_bitmask

__all__ = ["GrammarBatch", "GrammarCompiler", "apply_token_bitmask"]
