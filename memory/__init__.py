"""KV memory: the paged pool, its allocators, reservation policies and the token pool."""

from memory.index_allocator import IndexAllocator, OutOfIndices
from memory.kv_cache_manager import KVCacheManager, IntegrityError
from memory.radix_cache import PrefixMatch, RadixCache
from memory.swap_space import SwapKind, SwapOp, SwapSpace
from memory.reservation import ConservativeReservation, DynamicReservation, ReservationPolicy, make_reservation

# The device-side pools import torch; the scheduler needs none of them, and the CLI parses flags
# through the scheduler's imports, so they load on first use.
_LAZY = {"KVPool": "memory.kv_pool", "kv_bytes_per_token": "memory.kv_pool",
         "PinnedStaging": "memory.pinned_staging", "TokenPool": "memory.token_pool"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memory' has no attribute {name!r}")

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
