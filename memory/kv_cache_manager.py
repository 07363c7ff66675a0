"""Page tables: which KV pages each request holds.

Ownership: a page is free (in the allocator), or owned by exactly one request's page table.
The scheduler decides when a request gets pages (admission, growth) and when it gives them back
(finish, abort, preemption); this class only does the bookkeeping and checks the invariant
free + in use == total after every workload.
"""

from __future__ import annotations

from memory.index_allocator import IndexAllocator
from memory.reservation import ReservationPolicy


class IntegrityError(AssertionError):
    pass


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, reservation: ReservationPolicy, first_page: int = 1) -> None:
        self.page_size = page_size
        self.reservation = reservation
        self.allocator = IndexAllocator(num_pages, first=first_page)
        self.page_tables: dict[str, list[int]] = {}

    # -- sizing ---------------------------------------------------------------------------
    @property
    def total_pages(self) -> int:
        return self.allocator.total

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        return self.allocator.num_in_use / max(1, self.allocator.total)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # -- lifecycle ------------------------------------------------------------------------
    def can_admit(self, num_tokens: int, max_new_tokens: int) -> bool:
        need = self.pages_for(self.reservation.admission_tokens(num_tokens, max_new_tokens))
        return need <= self.allocator.num_free

    def admit(self, request_id: str, num_tokens: int, max_new_tokens: int) -> None:
        if request_id in self.page_tables:
            raise ValueError(f"request {request_id} already holds pages")
        upfront = self.pages_for(self.reservation.upfront_tokens(num_tokens, max_new_tokens))
        self.page_tables[request_id] = self.allocator.allocate(upfront)

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make the page table cover ``num_tokens``; False (and nothing allocated) if the pool is dry."""
        table = self.page_tables[request_id]
        missing = self.pages_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.allocator.num_free:
            return False
        table.extend(self.allocator.allocate(missing))
        return True

    def free(self, request_id: str) -> None:
        self.allocator.free(self.page_tables.pop(request_id))

    def holds(self, request_id: str) -> bool:
        return request_id in self.page_tables

    def check_integrity(self) -> None:
        try:
            self.allocator.check()
        except AssertionError as e:
            raise IntegrityError(str(e)) from e
        owned = [p for table in self.page_tables.values() for p in table]
        if len(owned) != len(set(owned)):
            raise IntegrityError("a page is owned by two requests")
        if len(owned) != self.allocator.num_in_use:
            raise IntegrityError(
                f"page tables hold {len(owned)} pages but the allocator has {self.allocator.num_in_use} in use"
            )
