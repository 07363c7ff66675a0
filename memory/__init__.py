"""KV memory bookkeeping, pure Python: page and slot allocators, reservation, the prefix cache, swap space.

The tensors these pages index (the KV pool, the token pool, pinned staging, the swapper) live in
``conveyor.memory.device`` and belong to the worker; nothing here imports torch.

Ownership: a page is free (allocator), private to one request, or owned by the prefix cache
(locked by the requests reading it, else evictable). The engine thread alone moves a page between
those states, and frees a request's pages only once no launched batch still reads them
(``KVCacheManager`` decides; ``Scheduler.batch_done`` tells it when).
"""

from conveyor.memory.index_allocator import IndexAllocator, OutOfIndices
from conveyor.memory.kv_cache_manager import PAGE_STATES, IntegrityError, KVCacheManager, TableState
from conveyor.memory.radix_cache import PrefixMatch, RadixCache
from conveyor.memory.reservation import ConservativeReservation, DynamicReservation, ReservationPolicy, make_reservation
from conveyor.memory.swap_space import SwapKind, SwapOp, SwapSpace

__all__ = [
    "ConservativeReservation",
    "DynamicReservation",
    "IndexAllocator",
    "IntegrityError",
    "KVCacheManager",
    "OutOfIndices",
    "PAGE_STATES",
    "PrefixMatch",
    "RadixCache",
    "ReservationPolicy",
    "SwapKind",
    "SwapOp",
    "SwapSpace",
    "TableState",
    "make_reservation",
]
