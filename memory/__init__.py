"""KV memory: the paged pool, its allocators, reservation policies and the token pool."""

from conveyor.memory.index_allocator import IndexAllocator, OutOfIndices
from conveyor.memory.kv_cache_manager import KVCacheManager, IntegrityError
from conveyor.memory.kv_pool import KVPool, kv_bytes_per_token
from conveyor.memory.pinned_staging import PinnedStaging
from conveyor.memory.radix_cache import PrefixMatch, RadixCache
from conveyor.memory.swap_space import SwapKind, SwapOp, SwapSpace
from conveyor.memory.reservation import ConservativeReservation, DynamicReservation, ReservationPolicy, make_reservation
from conveyor.memory.token_pool import TokenPool

__all__ = [
    "ConservativeReservation",
    "DynamicReservation",
    "IndexAllocator",
    "IntegrityError",
    "KVCacheManager",
    "KVPool",
    "OutOfIndices",
    "PinnedStaging",
    "PrefixMatch",
    "RadixCache",
    "SwapKind",
    "SwapOp",
    "SwapSpace",
    "ReservationPolicy",
    "TokenPool",
    "kv_bytes_per_token",
    "make_reservation",
]
