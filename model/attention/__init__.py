"""Paged attention behind one interface: a pure-torch reference (CPU, test oracle) and FlashInfer (CUDA)."""

from conveyor.model.attention.backend import AttentionBackend, AttentionMetadata
from conveyor.model.attention.torch_paged import TorchPagedAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention"]
