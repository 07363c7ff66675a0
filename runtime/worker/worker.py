"""One device rank: the model, its KV pool, token pool, pinned staging, CUDA graphs and swapper.

Built from an ``EngineConfig`` and a resolved model; sizes its KV pool (on CUDA, from
``--gpu-memory-utilization`` after a profiling forward) and tells the engine the result as a
``KVLayout``. The engine never touches these tensors; executors run batches on them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog
import torch

from conveyor.memory.device import KVPool, KVSwapper, PinnedStaging, TokenPool
from conveyor.model import ModelSource, load_model
from conveyor.model.attention import AttentionBackend, TorchPagedAttention
from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.executor import KVCompat, KVLayout, KVRegion
from conveyor.runtime.worker.model_runner import ModelRunner, staging_regions
from conveyor.scheduler import PoolWrite, Request, SamplingParams, ScheduledBatch, ScheduledSeq

if TYPE_CHECKING:
    from conveyor.model.attention.flashinfer_backend import FlashInferAttention
    from conveyor.model.parallel import TensorParallel

log = structlog.get_logger("conveyor.worker")

CPU_KV_CACHE_BYTES = 1 << 30
MAX_GRAPH_BATCH = 512
# Rows per GEMM in batch-invariant mode: one tile covers a decode step of up to 256 sequences; a
# larger tile wastes more on small batches, a smaller one launches more GEMMs per prefill.
BATCH_INVARIANT_TILE = 256


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available")
    return dev


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


class Worker:
    """``tp``: this worker is one rank of a tensor-parallel group (runtime/worker/tp_executor.py): it
    holds that rank's shard of the model and of every KV page, and its runner joins the group's sampling."""

    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int, output_vocab: int,
                 eos_token_ids: tuple[int, ...] = (), tp: TensorParallel | None = None) -> None:
        self.config = config
        self.tp = tp
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.max_model_len = max_model_len
        torch.manual_seed(config.seed)
        self.model = load_model(source, self.dtype, self.device, config.seed, tp)
        self.model_config = mcfg = self.model.config  # a rank's shard has its local head counts
        self.model.init_kernels(max_model_len + 1,
                                linear_tile=BATCH_INVARIANT_TILE if config.batch_invariant else None,
                                fused=config.fused_kernels and not config.enforce_eager and not config.batch_invariant)
        self.model.output_vocab = output_vocab

        backend = self._make_attention_backend()
        budget = self._kv_budget(backend)
        if tp is not None:  # page ids are the group's: every rank holds as many pages as the smallest can
            budget = tp.min_int(budget, self.device)
        self.kv_pool = KVPool.from_budget(
            budget, mcfg.num_layers, config.block_size, mcfg.num_kv_heads, mcfg.head_dim,
            self.dtype, self.device,
        )
        self.kv_layout = KVLayout(self.kv_pool.usable_pages, KVPool.RESERVED_PAGES, self.kv_pool.page_bytes)
        self.kv_region = self._kv_region(source.name)
        poison = os.environ.get("CONVEYOR_DEBUG_POISON") == "1"
        self.token_pool = TokenPool(config.max_num_seqs, max_model_len, self.device, poison=poison)
        staging = PinnedStaging(
            staging_regions(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                            -(-max_model_len // config.block_size) + 1),
            config.pipeline_depth + 1, self.device,
        )
        if tp is None:
            self.runner = ModelRunner(self.model, self.kv_pool, self.token_pool, backend, staging, self.device,
                                      config.seed)
        else:
            from conveyor.runtime.worker.tp_runner import ParallelModelRunner

            self.runner = ParallelModelRunner(self.model, self.kv_pool, self.token_pool, backend, staging,
                                              self.device, config.seed, tp=tp)
        self.runner.eos_token_ids = eos_token_ids  # what min_tokens masks
        if config.preemption_mode == "swap":
            self.runner.swapper = KVSwapper(self.kv_pool)
        if self.uses_graphs:
            from conveyor.runtime.worker.cuda_graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.model, self.kv_pool, self.token_pool, staging,
                                              min(config.max_num_seqs, MAX_GRAPH_BATCH), backend.workspace,
                                              batch_invariant=config.batch_invariant)
            max_pieces = min(config.max_piecewise_tokens, config.max_num_batched_tokens)
            if max_pieces > 0:
                from conveyor.runtime.worker.piecewise_graphs import PiecewiseGraphs

                self.runner.pieces = PiecewiseGraphs(self.model, self.kv_pool, self.token_pool, staging, max_pieces)

    def _kv_region(self, model_name: str) -> KVRegion:
        data = self.kv_pool.data  # [layer, page, kv, token, head, dim], contiguous
        elt = data.element_size()
        compat = KVCompat(model_name, str(self.dtype).removeprefix("torch."), data.shape[0], data.shape[4],
                          data.shape[5], data.shape[3], "layer,page,kv,token,head,dim")
        return KVRegion(data.data_ptr(), data.numel() * elt, "VRAM" if self.device.type == "cuda" else "DRAM",
                        self.device.index or 0 if self.device.type == "cuda" else 0, data.shape[0],
                        data.stride(0) * elt, data.stride(1) * elt, compat)

    @property
    def uses_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager

    def _make_attention_backend(self) -> TorchPagedAttention | FlashInferAttention:
        mcfg = self.model_config
        if self.device.type == "cuda":
            from conveyor.model.attention.flashinfer_backend import FlashInferAttention

            return FlashInferAttention(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, self.config.block_size,
                                       self.device, batch_invariant=self.config.batch_invariant)
        return TorchPagedAttention(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim)

    def _kv_budget(self, backend: AttentionBackend) -> int:
        cfg = self.config
        if cfg.kv_cache_memory is not None:
            return cfg.kv_cache_memory
        if self.device.type == "cpu":
            return CPU_KV_CACHE_BYTES
        peak = self._profile_forward(backend)
        free, total = torch.cuda.mem_get_info(self.device)
        graphs = 0
        if self.uses_graphs:
            from conveyor.runtime.worker.cuda_graphs import capture_sizes

            # Each captured graph keeps its own fp32 logits output alive.
            graphs = sum(capture_sizes(min(cfg.max_num_seqs, MAX_GRAPH_BATCH))) * self.model.output_vocab * 4 + (256 << 20)
        budget = int(total * cfg.gpu_memory_utilization) - (total - free) - peak - graphs
        log.info("kv budget", total_gib=round(total / 2**30, 1), used_gib=round((total - free) / 2**30, 2),
                 activation_peak_gib=round(peak / 2**30, 2), graphs_gib=round(graphs / 2**30, 2),
                 kv_gib=round(budget / 2**30, 2))
        return budget

    def _profile_forward(self, backend: AttentionBackend) -> int:
        """Peak bytes one full-budget prefill step allocates beyond what is already held."""
        cfg, mcfg = self.config, self.model_config
        tokens = min(cfg.max_num_batched_tokens, self.max_model_len - 1)
        pages = -(-tokens // cfg.block_size) + KVPool.RESERVED_PAGES
        kv = KVPool(mcfg.num_layers, pages, cfg.block_size, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device)
        pool = TokenPool(1, tokens, self.device)
        staging = PinnedStaging(staging_regions(tokens, 1, pages), 1, self.device)
        runner = ModelRunner(self.model, kv, pool, backend, staging, self.device)
        req = Request("profile", [0] * tokens, SamplingParams(max_tokens=1), 1)
        seq = ScheduledSeq(req, slot=0, start=0, num_tokens=tokens, samples=True,
                           pages=tuple(range(KVPool.RESERVED_PAGES, pages)), sample_index=0, epoch=0)
        batch = ScheduledBatch(-1, (seq,), 0, (PoolWrite(0, 0, tuple(req.prompt_token_ids)),), ())
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.execute(runner.prepare(batch))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del runner, kv, pool, staging
        torch.cuda.empty_cache()
        return peak
