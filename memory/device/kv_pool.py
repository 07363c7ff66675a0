"""The paged KV pool: one tensor holding every layer's pages, laid out the way FlashInfer reads it."""

from __future__ import annotations

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """``data[layer]`` is ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (FlashInfer's NHD layout).

    Page 0 is never handed out: padded batch rows (CUDA-graph padding, dummy decodes) write there,
    so a stray write can never land in a live request's page.
    """

    RESERVED_PAGES = 1

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_pages <= self.RESERVED_PAGES:
            raise ValueError(f"KV pool needs more than {self.RESERVED_PAGES} pages, got {num_pages}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.data = torch.zeros(
            (num_layers, num_pages, 2, page_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )

    @property
    def page_bytes(self) -> int:
        return self.data[:, 0].numel() * self.data.element_size()

    @classmethod
    def from_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "KVPool":
        page_bytes = page_size * kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        num_pages = budget_bytes // page_bytes
        if num_pages <= cls.RESERVED_PAGES:
            raise ValueError(
                f"KV cache budget of {budget_bytes / 2**20:.1f} MiB holds {num_pages} pages of "
                f"{page_bytes / 2**20:.2f} MiB; raise --kv-cache-memory / --gpu-memory-utilization"
            )
        return cls(num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, device)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - self.RESERVED_PAGES
