"""The text a request is routed by: its prompt, or its chat messages rendered to text.

Only what a worker's prefix cache would share matters, in order: for chat, each message's role
and content (the template around them is the same on every worker, so it adds nothing); for
completions, the prompt (a token-id prompt as its ids in decimal; a batch by its first prompt).
A body the router cannot read routes by the empty key: the worker answers it with its own 400.
"""

from __future__ import annotations

from typing import Any

MAX_KEY_CHARS = 1 << 16  # a prefix past this decides nothing more, and matching it costs time


def routing_key(path: str, body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    if path.endswith("/chat/completions"):
        key = _messages_text(body.get("messages"))
    else:
        key = _prompt_text(body.get("prompt"))
    return key[:MAX_KEY_CHARS]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return " ".join(map(str, prompt)) + " "
        return _prompt_text(prompt[0])
    return ""


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        parts.append(f"<{m.get('role', '')}>")
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: only the text ones are prompt text
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)
