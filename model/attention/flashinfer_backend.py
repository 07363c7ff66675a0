"""FlashInfer paged attention: a decode wrapper for one-token rows, a prefill wrapper for chunks.

``plan()`` only ever sees host int32 tensors (a device tensor there is a hidden host sync) plus the
device page list, which FlashInfer reads on the stream.

Each wrapper stages its schedule in one pinned host buffer that every plan() rewrites, and copies it
to the device asynchronously. If plan N+1 rewrote that buffer before plan N's copy ran, batch N
would run with N+1's schedule (mini-sglang #103, vllm #40756). So every plan records an event
after its copy, and the next plan on that wrapper waits for it: almost always already complete,
since the device is at most a batch or two behind.

Batch-invariant mode (``--batch-invariant``) sends every row, decode or prefill, through one fa2
prefill kernel configuration with the KV never split, so a token's attention output is the same
bits whatever else shares its step and however its prompt was chunked; see ``pin_query_tile``.
"""

from __future__ import annotations

import os

import torch

from conveyor.model.attention.backend import AttentionMetadata

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


# FlashInfer's fa2 planner picks the query tile from the batch's mean packed query length (query
# tokens x GQA group): 16 rows at a mean <= 16, else 64 or 128. Each tile height is a different kernel
# with a different split of the KV loop across warps, so the same query gets different bits.
INVARIANT_QUERY_TILE = 16


def pin_query_tile(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, last_page_len: torch.Tensor,
                   group: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a prefill plan with empty requests until its mean packed query length is at most 16.

    A padding request has no query rows and no pages (last page "full", so its KV length is 0):
    the planner counts it in the mean, and the kernel gives it no tiles. Host int32 tensors in, out.
    """
    batch = qo_indptr.shape[0] - 1
    rows = int(qo_indptr[-1])
    pad = max(0, -(-rows * group // INVARIANT_QUERY_TILE) - batch)
    if pad == 0:
        return qo_indptr, kv_indptr, last_page_len
    return (torch.cat([qo_indptr, qo_indptr[-1:].expand(pad)]),
            torch.cat([kv_indptr, kv_indptr[-1:].expand(pad)]),
            torch.cat([last_page_len, torch.full((pad,), page_size, dtype=last_page_len.dtype)]))


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
    uses_page_table = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device: torch.device, workspace: torch.Tensor | None = None, batch_invariant: bool = False) -> None:
        import flashinfer

        self.num_heads, self.num_kv_heads, self.head_dim, self.page_size = num_heads, num_kv_heads, head_dim, page_size
        self.batch_invariant = batch_invariant
        self.workspace = workspace if workspace is not None else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8,
                                                                             device=device)
        # Batch-invariant mode plans every row on the prefill wrapper; there is no decode plan.
        self.decode = None if batch_invariant else flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=decode_uses_tensor_cores(num_heads, num_kv_heads), backend="fa2")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2" if batch_invariant else "auto")
        self._decode_fence, self._prefill_fence = PlanFence(), PlanFence()
        self._meta: AttentionMetadata | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        nd, b = meta.num_decodes, meta.num_seqs
        indptr, last = meta.kv_indptr_cpu, meta.kv_last_page_len_cpu
        dtype = torch.bfloat16
        if self.batch_invariant:
            qo, kv_indptr, kv_last = pin_query_tile(meta.query_start_loc_cpu, indptr, last,
                                                    self.num_heads // self.num_kv_heads, self.page_size)
            with self._prefill_fence:
                self.prefill.plan(qo, kv_indptr, meta.kv_indices, kv_last,
                                  self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                                  causal=True, q_data_type=dtype, kv_data_type=dtype, disable_split_kv=True)
            return
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
                meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        append_kv(kv_cache, k, v, meta)
        out = torch.empty_like(q) if out is None else out
        if self.batch_invariant:
            return self.prefill.run(q, kv_cache, out=out)
        nd = meta.num_decodes
        split = int(meta.query_start_loc_cpu[nd])
        if nd:
            self.decode.run(q[:split], kv_cache, out=out[:split])
        if nd < meta.num_seqs:
            self.prefill.run(q[split:], kv_cache, out=out[split:])
        return out
