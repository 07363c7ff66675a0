"""Engine configuration. Field names follow vLLM's flags where the concept is the same."""

from __future__ import annotations

import msgspec


class ConfigError(ValueError):
    pass


class EngineConfig(msgspec.Struct, kw_only=True, frozen=True):
    model: str = "default"
    load_format: str = "auto"  # auto | dummy (random weights with the model's exact shapes)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    schedule_policy: str = "fcfs"  # fcfs | fifo | static | priority | sjf | srtf | fair | round-robin | adaptive | lpm
    # Aging (priority): per this many seconds at the head of its level, one level more urgent, so
    # nothing starves. sjf/srtf age by finished work instead (scheduler/policies/sjf.py).
    priority_aging_s: float = 30.0
    static_batch_size: int = 8  # static: requests per fixed batch
    static_batch_timeout: float = 0.5  # static: seconds the oldest waits before a partial batch starts
    round_robin_time_slice: int = 8  # round-robin: steps a tenant's queue keeps its turn
    # sjf/srtf/adaptive: where the length predictor's learning is read at start and written at close
    length_predictor_path: str | None = None
    # fair: a tenant's (request ``user``'s) share of service relative to others; unnamed tenants weigh 1
    tenant_weights: dict[str, float] = msgspec.field(default_factory=dict)
    reservation: str = "dynamic"  # conservative | dynamic
    reservation_beta: float = 0.3  # dynamic: starting share of max_tokens promised at admission
    reservation_adapt: bool = True  # dynamic: beta follows observed output lengths and retractions
    enable_prefix_caching: bool = True  # radix tree over token ids: requests reuse cached prompt pages
    preemption_mode: str = "recompute"  # recompute | swap (KV copied to host memory and back)
    swap_space: float = 4.0  # GiB of pinned host memory for swapped-out KV
    enforce_eager: bool = False  # CUDA: no CUDA graphs (decode or piecewise)
    # CUDA: prefill and mixed steps of up to this many tokens replay piecewise graphs (everything
    # but attention; runtime/worker/piecewise_graphs.py); larger ones, where launches are cheap next to the
    # compute, run eagerly. 0: always eager.
    max_piecewise_tokens: int = 512
    # A request's tokens do not depend on what shares its batches: fixed-tile GEMMs and one unsplit
    # attention kernel for every row. Slower; for reproducible outputs and tests.
    batch_invariant: bool = False
    # CUDA, unless enforce_eager: steps of up to 16 rows use model/triton_kernels.py (skinny GEMMs,
    # fused norms and RoPE) in place of cuBLAS and FlashInfer's separate kernels. Off under batch_invariant.
    fused_kernels: bool = True
    pipeline_depth: int = 2  # batches in flight: 1 = no overlap (the baseline), 2 or 3 = overlap
    # Ranks the model is split across (Megatron tensor parallelism, one process per rank; rank 0 is
    # this engine, runtime/worker/tp_executor.py starts the others): one GPU each on CUDA, gloo on CPU.
    tensor_parallel_size: int = 1
    served_model_name: str | None = None
    tokenizer: str | None = None  # a tokenizer directory; default: the model's own (presets have none)
    # Prefill/decode disaggregation (runtime/disagg): both = one process does everything; prefill =
    # computes prompts and pushes their KV; decode = owns requests, receives KV, decodes.
    role: str = "both"
    kv_transport: str = "nixl"  # nixl | loopback (in-process, tests only)
    kv_lease_s: float = 30.0  # decode: how long a request waits for its KV before it fails

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.max_piecewise_tokens < 0:
            raise ConfigError("max_piecewise_tokens must be >= 0")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_depth not in (1, 2, 3):
            raise ConfigError(f"pipeline_depth must be 1, 2 or 3, got {self.pipeline_depth}")
        if any(not w > 0 for w in self.tenant_weights.values()):
            raise ConfigError(f"tenant_weights must be > 0, got {self.tenant_weights}")
        if self.static_batch_size < 1 or self.round_robin_time_slice < 1:
            raise ConfigError("static_batch_size and round_robin_time_slice must be >= 1")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(f"preemption_mode must be recompute or swap, got {self.preemption_mode!r}")
        if self.swap_space < 0:
            raise ConfigError("swap_space must be >= 0 GiB")
        if not 0.0 <= self.reservation_beta <= 1.0:
            raise ConfigError(f"reservation_beta must be in [0, 1], got {self.reservation_beta}")
        if self.role not in ("both", "prefill", "decode"):
            raise ConfigError(f"role must be both, prefill or decode, got {self.role!r}")
        if self.role != "both" and self.tensor_parallel_size > 1:
            # Each rank's pool holds a slice of the KV heads: every rank pair would need its own transfer.
            raise ConfigError(f"role {self.role} runs with tensor_parallel_size 1 only, got {self.tensor_parallel_size}")
        if self.kv_transport not in ("nixl", "loopback"):
            raise ConfigError(f"kv_transport must be nixl or loopback, got {self.kv_transport!r}")
        if not self.kv_lease_s > 0:
            raise ConfigError(f"kv_lease_s must be > 0, got {self.kv_lease_s}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
