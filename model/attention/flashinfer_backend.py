"""FlashInfer paged attention: a decode wrapper for one-token rows, a prefill wrapper for chunks.

``plan()`` only ever sees host int32 tensors (a device tensor there is a hidden host sync) plus the
device page list, which FlashInfer reads on the stream.

Each wrapper stages its schedule in one pinned host buffer that every plan() rewrites, and copies it
to the device asynchronously. If plan N+1 rewrote that buffer before plan N's copy ran, batch N
would run with N+1's schedule (mini-sglang #103, vllm #40756). So every plan records an event
after its copy, and the next plan on that wrapper waits for it: almost always already complete,
since the device is at most a batch or two behind.
"""

from __future__ import annotations

import os

import torch

from model.attention.backend import AttentionMetadata

WORKSPACE_BYTES = 256 << 20


def decode_uses_tensor_cores(num_heads: int, num_kv_heads: int) -> bool:
    """Tensor-core decode pays off once a KV head serves several query heads (GQA group >= 4);
    CONVEYOR_DECODE_TENSOR_CORES=0/1 overrides, for measuring."""
    forced = os.environ.get("CONVEYOR_DECODE_TENSOR_CORES")
    return forced == "1" if forced in ("0", "1") else num_heads // num_kv_heads >= 4


def append_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """One kernel writes the step's keys and values into their pages (k/v may be strided views)."""
    import flashinfer

    flashinfer.append_paged_kv_cache(k, v, meta.batch_indices, meta.positions, kv_cache, meta.kv_indices,
                                     meta.kv_indptr, meta.kv_last_page_len, kv_layout="NHD")


class PlanFence:
    """Orders a wrapper's plan() calls after the device has consumed the previous plan's staging."""

    def __init__(self) -> None:
        self._event: torch.cuda.Event | None = None

    def __enter__(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def __exit__(self, *exc: object) -> None:
        self._event = torch.cuda.Event()
        self._event.record()


class FlashInferAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device: torch.device, workspace: torch.Tensor | None = None) -> None:
        import flashinfer

        self.num_heads, self.num_kv_heads, self.head_dim, self.page_size = num_heads, num_kv_heads, head_dim, page_size
        self.workspace = workspace if workspace is not None else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8,
                                                                             device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=decode_uses_tensor_cores(num_heads, num_kv_heads), backend="fa2")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="auto")
        self._decode_fence, self._prefill_fence = PlanFence(), PlanFence()
        self._meta: AttentionMetadata | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        nd, b = meta.num_decodes, meta.num_seqs
        indptr, last = meta.kv_indptr_cpu, meta.kv_last_page_len_cpu
        dtype = torch.bfloat16
        if nd:
            with self._decode_fence:
                self.decode.plan(indptr[: nd + 1], meta.kv_indices[: int(indptr[nd])], last[:nd],
                                 self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                                 q_data_type=dtype, kv_data_type=dtype)
        if nd < b:
            qo = meta.query_start_loc_cpu[nd:] - meta.query_start_loc_cpu[nd]
            base = int(indptr[nd])
            with self._prefill_fence:
                self.prefill.plan(qo, indptr[nd:] - base, meta.kv_indices[base:], last[nd:],
                                  self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                                  causal=True, q_data_type=dtype, kv_data_type=dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        append_kv(kv_cache, k, v, meta)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        split = int(meta.query_start_loc_cpu[nd])
        if nd:
            self.decode.run(q[:split], kv_cache, out=out[:split])
        if nd < meta.num_seqs:
            self.prefill.run(q[split:], kv_cache, out=out[split:])
        return out
