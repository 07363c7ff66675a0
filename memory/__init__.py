"""KV memory: the paged pool, its allocators, reservation policies and the token pool."""

from memory.index_allocator import IndexAllocator, OutOfIndices
from memory.kv_cache_manager import KVCacheManager, IntegrityError
from memory.kv_pool import KVPool, kv_bytes_per_token
from memory.pinned_staging import PinnedStaging
from memory.radix_cache import PrefixMatch, RadixCache
from memory.swap_space import SwapKind, SwapOp, SwapSpace
from memory.reservation import ConservativeReservation, DynamicReservation, ReservationPolicy, make_reservation
from memory.token_pool import TokenPool

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
