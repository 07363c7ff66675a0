"""Page tables: which KV pages each request reads, which it owns, and what the prefix cache holds.

Ownership: a page is free (in the allocator), private to exactly one request's page table, or
owned by the prefix cache (then any number of page tables may read it, under a lock). The
scheduler decides when a request gets pages (admission, growth) and gives them back (finish,
abort, preemption); this class does the bookkeeping and checks
free + private + cached == total after every workload.

Reservation: admission promises a request pages for ``admission_tokens`` (the reservation
policy's share of its prompt + max_tokens). Promised pages it has not grown into yet are
outstanding, and a new request is admitted only if its own promise fits beside all of them:
otherwise admission would eat the room running requests are about to decode into.

Disaggregation (``TableState``): a page table may also be lent to a peer process. On a prefill
worker it is ``SENDING`` while the transport still reads it; on a decode worker it is ``RECEIVING``
from admission until the peer says its KV is complete, and ``QUARANTINED`` once its request left
(abort, failure) while the peer might still write into it. Such a table keeps every page it holds,
and its lock on the cached prefix, until the disaggregation layer calls ``free``: a page a peer
may still write into or read is never handed to another request.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from conveyor.memory.index_allocator import IndexAllocator
from conveyor.memory.radix_cache import PrefixMatch, RadixCache, RadixNode
from conveyor.memory.reservation import ReservationPolicy


class IntegrityError(AssertionError):
    pass


class TableState(enum.Enum):
    """Who besides its request may touch a page table's private pages."""

    PRIVATE = "private"  # nobody: the request alone
    SENDING = "sending"  # P: the transport reads them into a peer's pages
    RECEIVING = "receiving"  # D: a peer writes the prompt's KV into them
    QUARANTINED = "quarantined"  # D: the request left, the peer may still write


PAGE_STATES = ("free", "private", "cached", "sending", "receiving", "quarantined")


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, reservation: ReservationPolicy, first_page: int = 1,
                 enable_prefix_caching: bool = False) -> None:
        self.page_size = page_size
        self.reservation = reservation
        self.allocator = IndexAllocator(num_pages, first=first_page)
        self.prefix_cache = RadixCache(page_size) if enable_prefix_caching else None
        self.page_tables: dict[str, list[int]] = {}
        self._cached: dict[str, set[int]] = {}  # pages of a table that the prefix cache owns
        self._locks: dict[str, RadixNode] = {}  # where each request's cached prefix ends
        self._promised: dict[str, int] = {}  # pages promised at admission
        self._states: dict[str, TableState] = {}  # tables not PRIVATE (disaggregation)
        # Sum over requests of promised pages not grown into yet, kept current on every change: it
        # is read per admission and, from the server thread, per metrics scrape.
        self.num_outstanding_pages = 0
        self.num_evicted_pages = 0

    # -- sizing ---------------------------------------------------------------------------
    @property
    def total_pages(self) -> int:
        return self.allocator.total

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def num_available_pages(self) -> int:
        """Free pages plus cached pages nobody reads: what an allocation can get."""
        evictable = self.prefix_cache.num_evictable_pages if self.prefix_cache else 0
        return self.allocator.num_free + evictable

    @property
    def num_cached_pages(self) -> int:
        return self.prefix_cache.num_pages if self.prefix_cache else 0

    def _outstanding(self, request_id: str) -> int:
        return max(0, self._promised[request_id] - len(self.page_tables[request_id]))

    @property
    def usage(self) -> float:
        """Fraction of pages requests hold or were promised (evictable cache counts as free)."""
        held = self.total_pages - self.num_available_pages + self.num_outstanding_pages
        return min(1.0, held / max(1, self.total_pages))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # -- prefix cache ---------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch | None:
        """The cached pages ``token_ids`` can start from; the last token is always left to
        compute, since its logits are what the next sample needs."""
        if self.prefix_cache is None or len(token_ids) <= self.page_size:
            return None
        match = self.prefix_cache.match(token_ids, max_pages=(len(token_ids) - 1) // self.page_size)
        return match if match.pages else None

    def cache(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Hand the whole pages of ``token_ids`` (whose KV is written, or being written by a launched
        batch) to the prefix cache, so later requests with the same prefix skip them."""
        if self.prefix_cache is None:
            return
        table = self.page_tables[request_id]
        node, taken = self.prefix_cache.insert(token_ids, table)
        self._cached[request_id].update(taken)
        self._relock(request_id, node)

    def _relock(self, request_id: str, node: RadixNode) -> None:
        assert self.prefix_cache is not None
        self.prefix_cache.lock(node)  # before the unlock: the shared part of the path stays locked
        old = self._locks.pop(request_id, None)
        if old is not None:
            self.prefix_cache.unlock(old)
        self._locks[request_id] = node

    # -- lifecycle ------------------------------------------------------------------------
    def admission_pages(self, num_tokens: int, max_new_tokens: int, match: PrefixMatch | None = None) -> int:
        need = self.pages_for(self.reservation.admission_tokens(num_tokens, max_new_tokens))
        return need - (match.num_pages if match else 0)

    def can_admit(self, num_tokens: int, max_new_tokens: int, match: PrefixMatch | None = None) -> bool:
        need = self.admission_pages(num_tokens, max_new_tokens, match)
        # A matched prefix that only eviction could free is not available to pay for itself.
        locked_by_match = self.prefix_cache.unlocked_pages_on_path(match.node) if match and self.prefix_cache else 0
        return need <= self.num_available_pages - locked_by_match - self.num_outstanding_pages

    def admit(self, request_id: str, num_tokens: int, max_new_tokens: int, match: PrefixMatch | None = None) -> None:
        if request_id in self.page_tables:
            raise ValueError(f"request {request_id} already holds pages")
        self._cached[request_id] = set()
        table: list[int] = []
        if match is not None:
            self._relock(request_id, match.node)  # before allocating: eviction must not take these
            table = list(match.pages)
            self._cached[request_id].update(table)
        self.page_tables[request_id] = table
        self._promised[request_id] = self.pages_for(self.reservation.admission_tokens(num_tokens, max_new_tokens))
        upfront = self.pages_for(self.reservation.upfront_tokens(num_tokens, max_new_tokens)) - len(table)
        if upfront > 0:
            table.extend(self._allocate(upfront))
        self.num_outstanding_pages += self._outstanding(request_id)

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make the page table cover ``num_tokens``; False (and nothing allocated) if the pool is dry."""
        table = self.page_tables[request_id]
        missing = self.pages_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.num_available_pages:
            return False
        before = self._outstanding(request_id)
        table.extend(self._allocate(missing))
        self.num_outstanding_pages += self._outstanding(request_id) - before
        return True

    def _allocate(self, n: int) -> list[int]:
        short = n - self.allocator.num_free
        if short > 0 and self.prefix_cache is not None:
            evicted = self.prefix_cache.evict(short)
            self.num_evicted_pages += len(evicted)
            self.allocator.free(evicted)
        return self.allocator.allocate(n)

    def free(self, request_id: str, token_ids: Sequence[int] | None = None) -> None:
        """Give the request's pages back; with ``token_ids`` (whose KV its pages hold), cache
        their whole pages first."""
        if token_ids is not None:
            self.cache(request_id, token_ids)
        self.num_outstanding_pages -= self._outstanding(request_id)
        table = self.page_tables.pop(request_id)
        cached = self._cached.pop(request_id)
        self._promised.pop(request_id)
        self._states.pop(request_id, None)
        node = self._locks.pop(request_id, None)
        if node is not None:
            assert self.prefix_cache is not None
            self.prefix_cache.unlock(node)
        self.allocator.free([p for p in table if p not in cached])

    def drop_cache(self) -> int:
        """Evict every cached page nobody reads (after a failed step, cached KV may never have been
        written); returns how many were freed."""
        if self.prefix_cache is None:
            return 0
        evicted = self.prefix_cache.evict(self.prefix_cache.num_evictable_pages)
        self.num_evicted_pages += len(evicted)
        self.allocator.free(evicted)
        return len(evicted)

    def holds(self, request_id: str) -> bool:
        return request_id in self.page_tables

    # -- disaggregation -------------------------------------------------------------------
    def set_state(self, request_id: str, state: TableState) -> None:
        if request_id not in self.page_tables:
            raise ValueError(f"request {request_id} holds no page table")
        if state is TableState.PRIVATE:
            self._states.pop(request_id, None)
        else:
            self._states[request_id] = state

    def state(self, request_id: str) -> TableState:
        return self._states.get(request_id, TableState.PRIVATE)

    def tables_in(self, state: TableState) -> list[str]:
        return [rid for rid, s in self._states.items() if s is state]

    def page_counts(self) -> dict[str, int]:
        """Pages by state (``PAGE_STATES``); they sum to the pool. A snapshot for metrics: the
        engine thread may move pages while another thread reads, so it copies first."""
        counts = dict.fromkeys(PAGE_STATES, 0)
        states = dict(self._states)
        for rid, table in list(self.page_tables.items()):
            cached = self._cached.get(rid, ())
            key = states.get(rid, TableState.PRIVATE).value
            counts[key] += sum(1 for p in table if p not in cached)
        counts["cached"] = self.num_cached_pages
        counts["free"] = self.allocator.num_free
        return counts

    def _check_locks(self, cache: RadixCache) -> None:
        """Every node's lock count is the number of requests whose lock path runs through it, and
        every cached page a request reads lies on that path (so eviction cannot take it)."""
        expected: dict[int, int] = {}
        for rid, node in self._locks.items():
            path: set[int] = set()
            while node is not cache.root:
                expected[id(node)] = expected.get(id(node), 0) + 1
                path.update(node.pages)
                node = node.parent  # type: ignore[assignment]
            if not self._cached[rid] <= path:
                raise IntegrityError(f"request {rid} reads cached pages its lock does not cover")
        for node in cache.nodes():
            if node is not cache.root and node.lock_ref != expected.get(id(node), 0):
                raise IntegrityError("a radix node's lock count disagrees with the requests holding locks")

    def check_integrity(self) -> None:
        try:
            self.allocator.check()
            if self.prefix_cache is not None:
                self.prefix_cache.check()
        except AssertionError as e:
            raise IntegrityError(str(e)) from e
        private = [p for rid, table in self.page_tables.items() for p in table if p not in self._cached[rid]]
        if len(private) != len(set(private)):
            raise IntegrityError("a page is owned by two requests")
        tree = set(self.prefix_cache.all_pages()) if self.prefix_cache else set()
        if len(tree) != self.num_cached_pages:
            raise IntegrityError("the prefix cache holds a page twice")
        if tree & set(private):
            raise IntegrityError("a page is both cached and private to a request")
        for rid, cached in self._cached.items():
            if not cached <= tree:
                raise IntegrityError(f"request {rid} reads a cached page the cache no longer holds")
        if self.prefix_cache is not None:
            self._check_locks(self.prefix_cache)
        if not self._states.keys() <= self.page_tables.keys():
            raise IntegrityError("a sending/receiving/quarantined state names no page table")
        if len(private) + len(tree) + self.allocator.num_free != self.total_pages:
            raise IntegrityError("free + private + cached pages do not add up to the pool")
        if self.num_outstanding_pages != sum(self._outstanding(rid) for rid in self.page_tables):
            raise IntegrityError("the outstanding-promise count drifted")
        if len(private) + len(tree) != self.allocator.num_in_use:
            raise IntegrityError(
                f"page tables hold {len(private)} private pages and the cache {len(tree)}, but the "
                f"allocator has {self.allocator.num_in_use} in use"
            )
