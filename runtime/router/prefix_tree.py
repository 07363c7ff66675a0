"""An approximate radix tree of the prompts sent to one worker, bounded in characters with LRU eviction.

The router never sees a worker's KV cache; it remembers what it sent where (sgl-router's
"approximate tree"). Keys are text: the prompt, or the chat messages rendered to text; matching
characters instead of tokens spares the router a tokenizer, at the cost of being approximate,
which is all routing needs. A worker evicts its own cache under memory pressure, so this tree
forgets too: past ``max_chars`` the least recently matched leaves go first.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    edge: str  # the characters on the edge from the parent into this node
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)  # first character of the child's edge -> child
    last_used: int = 0  # logical clock of the last insert or match through this node


def _common_prefix(a: str, b: str, start: int) -> int:
    """Length of the common prefix of ``a`` and ``b[start:]``."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class PrefixTree:
    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be >= 1")
        self.max_chars = max_chars
        self.root = _Node("", None)
        self.size = 0  # characters stored on all edges
        self._clock = itertools.count(1)

    def match(self, key: str) -> int:
        """How many leading characters of ``key`` were sent here before (and touch them for LRU)."""
        now = next(self._clock)
        node, pos = self.root, 0
        node.last_used = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix(child.edge, key, pos)
            child.last_used = now
            pos += n
            if n < len(child.edge):
                break
            node = child
        return pos

    def insert(self, key: str) -> None:
        now = next(self._clock)
        node, pos = self.root, 0
        node.last_used = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                leaf = _Node(key[pos:], node, last_used=now)
                node.children[key[pos]] = leaf
                self.size += len(leaf.edge)
                break
            n = _common_prefix(child.edge, key, pos)
            if n < len(child.edge):  # split the edge: a new inner node holds the shared part
                inner = _Node(child.edge[:n], node, last_used=now)
                node.children[key[pos]] = inner
                child.edge = child.edge[n:]
                child.parent = inner
                inner.children[child.edge[0]] = child
                child = inner
            child.last_used = now
            pos += n
            node = child
        if self.size > self.max_chars:
            self.evict(self.max_chars * 9 // 10)  # below the bound, so eviction runs once per many inserts

    def evict(self, target_chars: int) -> None:
        """Drop least recently used leaves until at most ``target_chars`` are stored."""
        tick = itertools.count()  # ties in last_used: any order, but heapq must not compare nodes
        leaves = [(n.last_used, next(tick), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(leaves)
        while self.size > target_chars and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.edge[0]]
            self.size -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, next(tick), parent))

    def clear(self) -> None:
        self.root = _Node("", None)
        self.size = 0

    def _nodes(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
