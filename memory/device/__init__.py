"""The device half of KV memory, owned by a worker: the paged KV pool, the token pool, pinned
staging buffers and the swapper that copies pages to host memory and back (torch)."""

from conveyor.memory.device.kv_pool import KVPool, kv_bytes_per_token
from conveyor.memory.device.kv_swapper import KVSwapper
from conveyor.memory.device.pinned_staging import PinnedStaging
from conveyor.memory.device.token_pool import TokenPool

__all__ = ["KVPool", "KVSwapper", "PinnedStaging", "TokenPool", "kv_bytes_per_token"]
