"""Paged attention in plain torch: slow, obviously right, and the oracle the FlashInfer backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conveyor.model.attention.backend import AttentionMetadata


class TorchPagedAttention:
    uses_page_table = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self._meta: AttentionMetadata | None = None
        self._decode_mask: torch.Tensor | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        nd = meta.num_decodes
        self._decode_mask = None
        if nd:
            max_kv = int(meta.kv_lens_cpu[:nd].max())
            kv_pos = torch.arange(max_kv)
            mask = kv_pos[None, :] < meta.kv_lens_cpu[:nd, None]
            self._decode_mask = mask[:, None, None, :].to(meta.kv_indices.device)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        table = meta.page_table
        assert table is not None and meta.slot_mapping is not None, "batch prepared for a backend without page tables"
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q) if out is None else out
        nd = meta.num_decodes
        qsl = meta.query_start_loc_cpu.tolist()
        kv_lens = meta.kv_lens_cpu.tolist()
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, table[:nd], max(kv_lens[:nd]))
        for i in range(nd, meta.num_seqs):
            s, e = qsl[i], qsl[i + 1]
            out[s:e] = self._prefill(q[s:e], kv_cache, table[i], kv_lens[i])
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, page_table: torch.Tensor, max_kv: int) -> torch.Tensor:
        k, v = gather_kv(kv_cache, page_table, max_kv)  # [B, L, Hkv, D]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, Hq, 1, D]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=self._decode_mask,
            enable_gqa=True,
        )
        return o.squeeze(2)

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
        k, v = gather_kv(kv_cache, pages[None], kv_len)
        n = q.shape[0]
        # Query i sits at position kv_len - n + i and sees every key up to and including itself.
        q_pos = torch.arange(kv_len - n, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
        return o[0].transpose(0, 1)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    page_size = kv_cache.shape[2]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, page_table: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, kv_len, Hkv, D] keys and values of each row's first kv_len tokens."""
    page_size = kv_cache.shape[2]
    num_pages = -(-kv_len // page_size)
    blocks = kv_cache[page_table[:, :num_pages].long()]  # [B, P, 2, page, H, D]
    b, p, _, s, h, d = blocks.shape
    k = blocks[:, :, 0].reshape(b, p * s, h, d)[:, :kv_len]
    v = blocks[:, :, 1].reshape(b, p * s, h, d)[:, :kv_len]
    return k, v
