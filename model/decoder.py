"""One decoder for the Llama family: Llama 2/3, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Projections are fused the way the kernels want them (qkv, gate_up); the loader maps HF names.
"""

from __future__ import annotations

import torch
from torch import nn

from conveyor.model.attention.backend import AttentionBackend, AttentionMetadata
from conveyor.model.config import ModelConfig
from conveyor.model.kernels import FlashInferKernels, TorchKernels, make_kernels
from conveyor.model.parallel import TensorParallel

Kernels = TorchKernels | FlashInferKernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, positions: torch.Tensor,
                kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (contiguous), k, v for attention: the qkv projection, Qwen3's q/k norms, RoPE."""
        t = x.shape[0]
        qkv = kernels.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            assert self.k_norm is not None
            q, k = kernels.qk_norm_rope(qkv, positions, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                        self.num_heads, self.num_kv_heads)
        else:
            q = qkv[:, : self.q_size].reshape(t, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size: self.q_size + self.kv_size].reshape(t, self.num_kv_heads, self.head_dim)
            q, k = kernels.rope(q, k, positions)
        return q.contiguous(), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        h = kernels.silu_and_mul(kernels.linear(x, self.gate_up_proj.weight))
        return kernels.linear(h, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kernels: Kernels | None = None
        # Set when this model is one rank's shard (model.parallel): cfg then holds local sizes, and
        # the embedding, row-parallel projections and LM head join the ranks' parts.
        self.tp: TensorParallel | None = None
        # Logits cover ids [0, output_vocab): a tokenizer smaller than the embedding (padded vocab,
        # or a stand-in tokenizer for dummy weights) cannot decode the rest, so they are never sampled.
        self.output_vocab = cfg.vocab_size

    def init_kernels(self, max_positions: int, linear_tile: int | None = None, fused: bool = False) -> None:
        """Pick the kernel set for the weights' device (after loading) and build the RoPE tables;
        ``fused``: on CUDA, small batches run model/triton_kernels.py."""
        device = self.embed_tokens.weight.device
        self.kernels = make_kernels(self.config.rope, self.config.head_dim, max_positions, device, linear_tile, fused)

    # The forward in pieces, split at attention: ``runtime.piecewise_graphs`` captures everything
    # between two attentions as one CUDA graph and runs attention (ragged, planned per batch) eagerly.
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input-normed hidden, residual) [T, hidden] for layer 0."""
        kernels = self._kernels()
        residual = self.embed_tokens(input_ids) if self.tp is None else self._embed_parallel(input_ids)
        first = self.layers[0].input_layernorm
        return kernels.rms_norm(residual, first.weight, first.eps), residual

    def attention_inputs(self, i: int, h: torch.Tensor,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layers[i].self_attn.project(h, positions, self._kernels())

    def finish_layer(self, i: int, o: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i after its attention output ``o``: the output projection, the MLP and the next
        layer's input norm (the final norm after the last layer). ``residual`` may be updated in place."""
        kernels = self._kernels()
        layer = self.layers[i]
        attn, mlp, post = layer.self_attn, layer.mlp, layer.post_attention_layernorm
        norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
        o = o.reshape(o.shape[0], attn.q_size)
        if self.tp is None:  # each projection fused with the residual add and norm after it
            h, residual = kernels.linear_add_rms_norm(o, attn.o_proj.weight, residual, post.weight, post.eps)
            gate_up = kernels.linear(h, mlp.gate_up_proj.weight)
            return kernels.linear_add_rms_norm(gate_up, mlp.down_proj.weight, residual, norm.weight, norm.eps,
                                               silu_mul=True)
        # Row-parallel projections hold partial sums: all-reduced before the residual add.
        h = self.tp.all_reduce(kernels.linear(o, attn.o_proj.weight))
        h, residual = kernels.add_rms_norm(h, residual, post.weight, post.eps)
        h = self.tp.all_reduce(mlp(h, kernels))
        return kernels.add_rms_norm(h, residual, norm.weight, norm.eps)

    def _embed_parallel(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank embeds the ids in its rows, zeros the rest, all-reduce."""
        assert self.tp is not None
        rows = self.config.vocab_size
        local = input_ids - self.tp.rank * rows
        outside = (local < 0) | (local >= rows)
        out = self.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))

    def _kernels(self) -> Kernels:
        assert self.kernels is not None, "call init_kernels() after loading weights"
        return self.kernels

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; ``kv_caches[i]`` is layer i's pages."""
        h, residual = self.embed(input_ids)
        for i in range(len(self.layers)):
            q, k, v = self.attention_inputs(i, h, positions)
            o = backend.forward(q, k, v, kv_caches[i], meta)
            h, residual = self.finish_layer(i, o, residual)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is not None:  # each rank's vocabulary rows, gathered; the padding rows cut off
            return self.tp.all_gather_last(self._kernels().linear(hidden, weight))[:, : self.output_vocab].float().contiguous()
        return self._kernels().linear(hidden, weight[: self.output_vocab]).float()
