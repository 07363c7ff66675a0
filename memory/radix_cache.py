"""Prefix cache: a radix tree over token ids at page granularity, owning the pages it holds.

Every edge is a run of whole pages: its key is ``page_size * len(pages)`` token ids and its
``pages`` hold their KV. Only full pages are cached, so a cached page is never written again
and copy-on-write is never needed: a request that matches a prefix reads the tree's pages and
writes its own from the first token after the match.

Ownership: a page is free, private to one request, or owned by the tree. A request using a
cached prefix *locks* the node where its match ends; a lock counts on that node and every
ancestor, and only unlocked leaves are evicted (least recently used first), so pages an
in-flight batch reads are never handed out again.

Eviction must not walk the tree (it runs on the launch path, and a full cache holds thousands of
nodes): the evictable leaves are kept in a set, ordered by a heap of (last access, node) entries
that are pushed whenever a node becomes evictable or is touched, and skipped when stale.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]  # token ids of this edge, a whole number of pages
    pages: list[int]
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)  # by first page's tokens
    lock_ref: int = 0  # requests whose match ends at or below this node
    last_access: int = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


class PrefixMatch:
    """The pages of a cached prefix and the node that must stay locked while they are read."""

    __slots__ = ("node", "pages")

    def __init__(self, node: RadixNode, pages: list[int]) -> None:
        self.node = node
        self.pages = pages

    @property
    def num_pages(self) -> int:
        return len(self.pages)


class RadixCache:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = RadixNode((), [], None)
        self.root.lock_ref = 1  # never evicted
        self._clock = itertools.count(1)
        self.num_pages = 0  # pages the tree owns
        self.num_locked_pages = 0  # of which pages on a locked path (not evictable)
        self._evictable: set[RadixNode] = set()  # unlocked leaves
        self._heap: list[tuple[int, int, RadixNode]] = []  # (last_access, tie-break, node); stale ones skipped
        self._seq = itertools.count()

    def _note(self, node: RadixNode) -> None:
        """Record whether ``node`` is evictable now, after its lock, children or access time changed."""
        if node is not self.root and node.is_leaf and node.lock_ref == 0:
            self._evictable.add(node)
            heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
            if len(self._heap) > 4 * len(self._evictable) + 1024:  # mostly stale: rebuild
                self._heap = [e for e in self._heap if self._is_current(e)]
                heapq.heapify(self._heap)
        else:
            self._evictable.discard(node)

    def _is_current(self, entry: tuple[int, int, RadixNode]) -> bool:
        last_access, _, node = entry
        return node in self._evictable and node.last_access == last_access

    # -- lookups --------------------------------------------------------------------------
    def _page_key(self, tokens: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(tokens[i * self.page_size : (i + 1) * self.page_size])

    def match(self, tokens: Sequence[int], max_pages: int | None = None) -> PrefixMatch:
        """The longest cached prefix of ``tokens`` in whole pages (at most ``max_pages``).

        A match that ends inside an edge splits it, so the returned node covers exactly the
        matched pages and locking it protects nothing more than what is read.
        """
        limit = len(tokens) // self.page_size
        if max_pages is not None:
            limit = min(limit, max_pages)
        node, pages, i = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while i < limit:
            child = node.children.get(self._page_key(tokens, i))
            if child is None:
                break
            n = self._common_pages(child, tokens, i, limit)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = now
            self._note(child)
            pages.extend(child.pages)
            node, i = child, i + n
        return PrefixMatch(node, pages)

    def match_len(self, tokens: Sequence[int]) -> int:
        """Whole pages of ``tokens`` the cache holds, without touching LRU order or splitting edges:
        a cheap look for ordering the waiting queue."""
        node, i, limit = self.root, 0, len(tokens) // self.page_size
        while i < limit:
            child = node.children.get(self._page_key(tokens, i))
            if child is None:
                break
            n = self._common_pages(child, tokens, i, limit)
            i += n
            if n < len(child.pages):
                break
            node = child
        return i

    def _common_pages(self, node: RadixNode, tokens: Sequence[int], start: int, limit: int) -> int:
        n = 0
        while n < len(node.pages) and start + n < limit and \
                node.key[n * self.page_size : (n + 1) * self.page_size] == self._page_key(tokens, start + n):
            n += 1
        return n

    def _split(self, node: RadixNode, n: int) -> RadixNode:
        """Cut ``node``'s edge after ``n`` pages; returns the new upper node."""
        cut = n * self.page_size
        upper = RadixNode(node.key[:cut], node.pages[:n], node.parent, lock_ref=node.lock_ref,
                          last_access=node.last_access)
        assert node.parent is not None
        node.parent.children[upper.key[: self.page_size]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[n:], upper
        upper.children[node.key[: self.page_size]] = node
        return upper

    # -- insertion ------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[RadixNode, list[int]]:
        """Cache the whole pages of ``tokens`` whose KV is in ``pages`` (one page per page_size tokens).

        Returns the node covering all of them and the pages the tree took ownership of. The
        caller keeps owning the rest: pages whose prefix was already cached (duplicates of the
        tree's own) stay private to it.
        """
        n_pages = min(len(pages), len(tokens) // self.page_size)
        node, i, taken = self.root, 0, []
        now = next(self._clock)
        while i < n_pages:
            child = node.children.get(self._page_key(tokens, i))
            if child is None:
                new = RadixNode(tuple(tokens[i * self.page_size : n_pages * self.page_size]), list(pages[i:n_pages]),
                                node, last_access=now)
                node.children[new.key[: self.page_size]] = new
                taken.extend(new.pages)
                self.num_pages += len(new.pages)
                self._note(node)  # no longer a leaf
                self._note(new)
                return new, taken
            n = self._common_pages(child, tokens, i, n_pages)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = now
            self._note(child)
            node, i = child, i + n
        return node, taken

    # -- locks ----------------------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_locked_pages += len(node.pages)
                self._evictable.discard(node)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise AssertionError("radix node unlocked more often than locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_locked_pages -= len(node.pages)
                self._note(node)
            node = node.parent  # type: ignore[assignment]

    def unlocked_pages_on_path(self, node: RadixNode) -> int:
        """Pages from ``node`` up to its deepest locked ancestor: what locking it takes off the
        evictable count."""
        n = 0
        while node is not self.root and node.lock_ref == 0:
            n += len(node.pages)
            node = node.parent  # type: ignore[assignment]
        return n

    # -- eviction -------------------------------------------------------------------------
    @property
    def num_evictable_pages(self) -> int:
        return self.num_pages - self.num_locked_pages

    def evict(self, num_pages: int) -> list[int]:
        """Drop unlocked leaves, least recently used first, until ``num_pages`` pages are freed
        (or nothing evictable is left); returns the freed pages."""
        freed: list[int] = []
        while self._heap and len(freed) < num_pages:
            entry = heapq.heappop(self._heap)
            if not self._is_current(entry):
                continue
            node = entry[2]
            self._evictable.discard(node)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[: self.page_size]]
            freed.extend(node.pages)
            self.num_pages -= len(node.pages)
            self._note(parent)  # may have become an unlocked leaf
        return freed

    def nodes(self) -> Iterator[RadixNode]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # -- checks ---------------------------------------------------------------------------
    def all_pages(self) -> list[int]:
        return [p for n in self.nodes() for p in n.pages]

    def check(self) -> None:
        pages, locked = 0, 0
        for node in self.nodes():
            if node is self.root:
                continue
            if node.lock_ref < 0:
                raise AssertionError("negative lock count in the prefix cache")
            if len(node.key) != len(node.pages) * self.page_size or not node.pages:
                raise AssertionError("a radix edge's key and pages disagree")
            parent = node.parent
            assert parent is not None
            if parent.children.get(node.key[: self.page_size]) is not node:
                raise AssertionError("a radix node is not where its parent files it")
            if parent is not self.root and parent.lock_ref < node.lock_ref:
                raise AssertionError("a node holds more locks than its parent")
            pages += len(node.pages)
            locked += len(node.pages) if node.lock_ref else 0
        leaves = {n for n in self.nodes() if n is not self.root and n.is_leaf and n.lock_ref == 0}
        if leaves != self._evictable:
            raise AssertionError("the prefix cache's evictable-leaf set drifted")
        if pages != self.num_pages or locked != self.num_locked_pages:
            raise AssertionError(f"prefix cache counts drifted: {pages}/{locked} pages/locked, "
                                 f"counted {self.num_pages}/{self.num_locked_pages}")
