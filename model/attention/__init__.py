"""Paged attention behind one interface: a pure-torch reference (CPU, test oracle) and FlashInfer (CUDA)."""

from model.attention.backend import AttentionBackend, AttentionMetadata
from model.attention.torch_paged import TorchPagedAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention"]
