"""Prefill and mixed batches as piecewise CUDA graphs: the forward is cut at attention, and each
piece between two attentions is one graph per padded token count; attention runs eagerly between
replays, planned per batch as before (ragged lengths and page lists are what graphs cannot hold).

Why: an eager step launches about a dozen kernels per layer from Python, ~0.45 ms per layer on the
H100's host: a mixed step of qwen3-0.6b (28 layers) took 12.95 ms to launch whatever its token
count, the device idling behind it, where a graphed decode step runs in 1.7 ms. Every step that
admits a request pays it, so it was most of TTFT and of what arrivals cost the requests already
decoding. As pieces, a layer is one replay plus the eager attention calls (KV append, decode and
prefill kernels): 5.6 ms per mixed step, TTFT 2.1x lower (``scripts/bench_piecewise.py``). vLLM
gets the same split from torch.compile; here the decoder exposes its pieces directly
(``DecoderModel.embed / attention_inputs / finish_layer``).

Every piece reads and writes fixed buffers (hidden rows padded to the graph's size): the residual
stream, q/k/v for the attention that follows, its output ``o`` for the piece after. Padded rows
gather the padding slot's position 0 and are never attended: attention sees the first T rows only,
so they cost a little compute and change nothing (every piece is row-wise). Temporaries inside a
piece come from one memory pool shared by all pieces: none outlives its own replay.

``capture=False`` runs the same pieces eagerly on the same buffers: the CPU tests' path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from conveyor.memory.device import KVPool, PinnedStaging, TokenPool
from conveyor.model.attention import AttentionBackend, AttentionMetadata
from conveyor.model.decoder import DecoderModel
from conveyor.runtime.worker.cuda_graphs import capture_error_mode

MIN_TOKENS = 16


def capture_token_sizes(max_tokens: int) -> list[int]:
    """Powers of two from 16 up to ``max_tokens``, and ``max_tokens`` itself."""
    sizes, n = [], MIN_TOKENS
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return [*sizes, max_tokens]


class PiecewiseGraphs:
    def __init__(self, model: DecoderModel, kv_pool: KVPool, token_pool: TokenPool, staging: PinnedStaging,
                 max_tokens: int, capture: bool = True) -> None:
        cfg = model.config
        self.model, self.kv_pool, self.token_pool = model, kv_pool, token_pool
        self.sizes = capture_token_sizes(max_tokens)
        self.num_layers = cfg.num_layers
        m = self.sizes[-1]
        dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device

        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(m, *shape, dtype=dtype, device=device)

        self.residual, self.hidden = buffer(cfg.hidden_size), buffer(cfg.hidden_size)
        self.q, self.o = buffer(cfg.num_heads, cfg.head_dim), buffer(cfg.num_heads, cfg.head_dim)
        self.k, self.v = buffer(cfg.num_kv_heads, cfg.head_dim), buffer(cfg.num_kv_heads, cfg.head_dim)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture(staging.region("token_slots"), staging.region("positions"))

    def size_for(self, num_tokens: int) -> int | None:
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    # -- the pieces -----------------------------------------------------------------------
    @torch.inference_mode()
    def _piece(self, i: int, n: int, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Piece i on the first ``n`` rows: 0 embeds and projects layer 0's q/k/v; 1..L-1 finish
        layer i-1 and project layer i's; L finishes the last layer into ``hidden``."""
        model, residual = self.model, self.residual[:n]
        if i == 0:
            h, res = model.embed(self.token_pool.gather(slots[:n], positions[:n]))
        else:
            h, res = model.finish_layer(i - 1, self.o[:n], residual)
        if res.data_ptr() != residual.data_ptr():  # FlashInfer's fused add-norm updates it in place already
            residual.copy_(res)
        if i == self.num_layers:
            self.hidden[:n].copy_(h)
            return
        q, k, v = model.attention_inputs(i, h, positions[:n])
        self.q[:n].copy_(q)
        self.k[:n].copy_(k)
        self.v[:n].copy_(v)

    def _capture(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        # Safe inputs for warm-up and capture: position 0 of the padding slot, which the token pool's
        # poison check accepts (the next batch's staging overwrites them).
        slots.fill_(self.token_pool.padding_slot)
        positions.zero_()
        pool = torch.cuda.graph_pool_handle()
        mode = capture_error_mode(self.model)
        # Warm-up outside capture loads modules and picks GEMMs: at the largest size, and at the
        # smallest, where a small step's kernels (model/triton_kernels.py) compile before any capture.
        for n in {self.sizes[-1], self.sizes[0]}:
            for i in range(self.num_layers + 1):
                self._piece(i, n, slots, positions)
        torch.cuda.synchronize()
        for n in reversed(self.sizes):  # largest first: the smaller pieces fit in what it freed
            graphs = []
            for i in range(self.num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                    self._piece(i, n, slots, positions)
                graphs.append(graph)
            self._graphs[n] = graphs
        torch.cuda.synchronize()

    # -- a batch --------------------------------------------------------------------------
    def run(self, size: int, num_tokens: int, backend: AttentionBackend, meta: AttentionMetadata,
            slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [size, hidden] (the first ``num_tokens`` rows are the batch's), after
        ``backend.plan(meta)``. ``slots``/``positions`` are padded to ``size`` rows; with graphs
        they are already in the staging regions the graphs read, and only the eager path uses them."""
        graphs = self._graphs.get(size)
        piece: Callable[[int], None] = (
            (lambda i: graphs[i].replay()) if graphs is not None
            else (lambda i: self._piece(i, size, slots, positions)))
        t = num_tokens
        for i in range(self.num_layers):
            piece(i)
            backend.forward(self.q[:t], self.k[:t], self.v[:t], self.kv_pool.data[i], meta, out=self.o[:t])
        piece(self.num_layers)
        return self.hidden[:size]
