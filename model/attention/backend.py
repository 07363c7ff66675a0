"""The contract between a batch's metadata and an attention kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """One ragged batch. Sequences are ordered decodes first (one query token each), then prefill chunks.

    Host tensors (``*_cpu``) are what planners read; device tensors are what kernels read. Both
    describe the same batch and are never mutated after the batch is built.
    """

    num_decodes: int
    query_start_loc_cpu: torch.Tensor  # [B+1] int32: sequence i's queries are tokens [qsl[i], qsl[i+1])
    kv_lens_cpu: torch.Tensor  # [B] int32: KV length of sequence i after this step's tokens are written
    # What a backend with ``uses_page_table`` reads (None for the others):
    page_table: torch.Tensor | None  # [B, max_pages] int32, device; unused entries are page 0
    slot_mapping: torch.Tensor | None  # [T] int32, device: page * page_size + offset where token t's KV goes
    page_size: int
    # The same pages as CSR, the form FlashInfer plans from: sequence i reads pages
    # kv_indices[kv_indptr[i]:kv_indptr[i+1]], the last of them holding kv_last_page_len[i] tokens.
    kv_indptr_cpu: torch.Tensor  # [B+1] int32
    kv_indices: torch.Tensor  # [nnz_pages] int32, device
    kv_last_page_len_cpu: torch.Tensor  # [B] int32
    # Device copies for kernels that append KV in one launch (FlashInfer's append_paged_kv_cache).
    kv_indptr: torch.Tensor  # [B+1] int32, device
    kv_last_page_len: torch.Tensor  # [B] int32, device
    batch_indices: torch.Tensor  # [T] int32, device: the sequence each query token belongs to
    positions: torch.Tensor  # [T] int32, device

    @property
    def num_seqs(self) -> int:
        return self.kv_lens_cpu.shape[0]


class AttentionBackend(Protocol):
    uses_page_table: bool  # reads page_table / slot_mapping (else only the CSR page lists)

    def plan(self, meta: AttentionMetadata) -> None:
        """Called once per batch before the forward (FlashInfer builds its schedule here)."""
        ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D]; writes k/v into ``kv_cache`` (one layer) and returns [T, Hq, D]
        (``out`` when given)."""
        ...
