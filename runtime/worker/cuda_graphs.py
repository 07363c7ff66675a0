"""Decode as CUDA graphs: one graph per padded batch size, replayed after a FlashInfer plan().

A graph covers the token-pool gather, the whole forward and the logits; sampling stays eager (it
depends on per-request settings). Its static inputs are views of fixed regions of the pinned
staging buffer's device side, and so are its FlashInfer wrapper's page-list buffers: preparing a
batch is all it takes to feed the next replay, and the plan before it (``fast_decode_plan``, as
SGLang does) only schedules, copying nothing. Padded rows read and write only the padding slot
and the reserved KV page 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from conveyor.memory.device import KVPool, PinnedStaging, TokenPool
from conveyor.model.attention import AttentionMetadata
from conveyor.model.attention.flashinfer_backend import PlanFence, append_kv, decode_uses_tensor_cores
from conveyor.model.decoder import DecoderModel


def capture_error_mode(model: DecoderModel) -> str:
    """torch's default ("global") fails a capture when any thread makes an unsafe CUDA call during it;
    a tensor-parallel rank's NCCL watchdog thread queries events all along, so its captures check only
    the capturing thread. Single-device capture keeps the default."""
    return "global" if model.tp is None else "thread_local"


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class _GraphDecodeAttention:
    """The attention backend inside a captured graph: plan() happens outside, before each replay."""

    def __init__(self, wrapper) -> None:
        self.wrapper = wrapper

    def plan(self, meta: AttentionMetadata) -> None:
        raise AssertionError("graph decode attention is planned by DecodeGraphs.replay")

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        append_kv(kv_cache, k, v, meta)
        return self.wrapper.run(q, kv_cache)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, wrapper, logits: torch.Tensor, plan_info: list) -> None:
        self.graph, self.wrapper, self.logits, self.plan_info = graph, wrapper, logits, plan_info
        self.fence = PlanFence()


class DecodeGraphs:
    def __init__(self, model: DecoderModel, kv_pool: KVPool, token_pool: TokenPool, staging: PinnedStaging,
                 max_batch: int, workspace: torch.Tensor, batch_invariant: bool = False) -> None:
        import flashinfer
        from flashinfer.decode import fast_decode_plan

        self._fast_plan = fast_decode_plan
        cfg = model.config
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_pool.page_size)
        self.sizes = capture_sizes(max_batch)
        # Batch-invariant decode: the tensor-core kernel with the KV never split is the same fa2
        # kernel, bit for bit, as the eager path's pinned prefill plan (measured on an H100), so a
        # token gets the same attention in a graph, a mixed batch or a recomputed prefill.
        self.batch_invariant = batch_invariant
        tensor_cores = batch_invariant or decode_uses_tensor_cores(cfg.num_heads, cfg.num_kv_heads)
        self._graphs: dict[int, _Graph] = {}
        pool = torch.cuda.graph_pool_handle()
        slots, positions = staging.region("decode_token_slots"), staging.region("decode_positions")
        kv_indices, batch_indices = staging.region("kv_indices"), staging.region("decode_batch_indices")
        kv_indptr, last_len = staging.region("kv_indptr"), staging.region("kv_last_page_len")
        # Safe values for warm-up and capture: every row decodes position 0 of the padding slot
        # into page 0.
        slots.fill_(token_pool.padding_slot)
        positions.zero_()
        kv_indices.zero_()
        last_len.fill_(1)
        kv_indptr.copy_(torch.arange(kv_indptr.shape[0], dtype=torch.int32))
        batch_indices.copy_(torch.arange(batch_indices.shape[0], dtype=torch.int32))
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=kv_indptr[: bs + 1], paged_kv_indices_buffer=kv_indices,
                paged_kv_last_page_len_buffer=last_len[:bs], backend="fa2",
            )
            meta = AttentionMetadata(
                num_decodes=bs,
                query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32),
                kv_lens_cpu=torch.ones(bs, dtype=torch.int32),
                page_table=None,
                slot_mapping=None,
                page_size=kv_pool.page_size,
                kv_indptr_cpu=torch.arange(bs + 1, dtype=torch.int32),
                kv_indices=kv_indices[:bs],
                kv_last_page_len_cpu=torch.ones(bs, dtype=torch.int32),
                kv_indptr=kv_indptr[: bs + 1],
                kv_last_page_len=last_len[:bs],
                batch_indices=batch_indices[:bs],
                positions=positions[:bs],
            )
            # The full planner once, on its own copy of the page list (it copies that into the
            # wrapper's buffer, which is the staging region itself): it picks the kernel and
            # caches the module the fast plans reuse.
            self._plan(type(wrapper).plan, wrapper, meta, kv_indices[:bs].clone())
            backend = _GraphDecodeAttention(wrapper)
            inputs = (token_pool, kv_pool, slots[:bs], positions[:bs], backend, meta)
            self._forward(model, *inputs)  # warm-up outside capture: loads modules, fills cached buffers
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_error_mode(model)):
                logits = self._forward(model, *inputs)
            self._graphs[bs] = _Graph(graph, wrapper, logits, list(wrapper._plan_info))
        torch.cuda.synchronize()

    @staticmethod
    def _forward(model: DecoderModel, token_pool: TokenPool, kv_pool: KVPool, slots: torch.Tensor,
                 positions: torch.Tensor, backend: _GraphDecodeAttention, meta: AttentionMetadata) -> torch.Tensor:
        """What a decode graph holds: gather input ids from the token pool, the forward, the logits."""
        ids = token_pool.gather(slots, positions)
        hidden = model(ids, positions, kv_pool.data, backend, meta)  # type: ignore[arg-type]
        return model.compute_logits(hidden)

    def batch_size_for(self, n: int) -> int | None:
        for bs in self.sizes:
            if bs >= n:
                return bs
        return None

    def _plan(self, plan: Callable[..., None], wrapper, meta: AttentionMetadata, kv_indices: torch.Tensor) -> None:
        """``plan(wrapper, ...)`` with the arguments the capture used: the replays' plans must match it."""
        hq, hkv, d, ps = self.heads
        plan(wrapper, meta.kv_indptr_cpu, kv_indices, meta.kv_last_page_len_cpu, hq, hkv, d, ps,
             q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, disable_split_kv=self.batch_invariant)

    def plan(self, bs: int, meta: AttentionMetadata) -> None:
        """Schedule the next replay of graph ``bs`` over ``meta``'s pages, already staged in place."""
        g = self._graphs[bs]
        with g.fence:
            self._plan(self._fast_plan, g.wrapper, meta, meta.kv_indices)
        # The plan's launch parameters were baked into the graph at capture; they must not move.
        assert g.wrapper._plan_info == g.plan_info, "FlashInfer decode plan changed shape under a graph"

    def replay(self, bs: int) -> torch.Tensor:
        """Launch graph ``bs`` (planned); its logits [bs, V]."""
        g = self._graphs[bs]
        g.graph.replay()
        return g.logits
