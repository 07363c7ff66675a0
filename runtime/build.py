"""An engine for a config: the model resolved, the tokenizer, a device worker and its executor, and
the engine core over them. Entry points (``AsyncEngine``, ``LLM``, tools, scripts) build through here."""

from __future__ import annotations

import gc
import os
import uuid

import structlog

from conveyor.model import resolve_model
from conveyor.model.tokenizer import load_tokenizer
from conveyor.runtime.disagg.channel import HttpPrefillChannel
from conveyor.runtime.disagg.decode import DecodeReceiver, PrefillChannel
from conveyor.runtime.disagg.prefill import PrefillPusher
from conveyor.runtime.disagg.transport import Transport, make_transport
from conveyor.runtime.engine.config import ConfigError, EngineConfig
from conveyor.runtime.engine.core import EngineCore, ModelInfo, resolve_max_model_len
from conveyor.runtime.worker.executors import make_executor
from conveyor.runtime.worker.worker import Worker

log = structlog.get_logger("conveyor.engine")


def build_engine(config: EngineConfig) -> EngineCore:
    source = resolve_model(config.model, config.load_format)
    mcfg = source.config
    tokenizer_dir = config.tokenizer or source.tokenizer_dir
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    vocab = mcfg.vocab_size
    if tokenizer is not None:
        if len(tokenizer) > mcfg.vocab_size:
            raise ConfigError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, more than the "
                              f"model's vocabulary of {mcfg.vocab_size}")
        vocab = len(tokenizer)  # the embedding may have padding rows no token maps to: never sample them
    eos = set(mcfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    model = ModelInfo(source.name, vocab, mcfg.max_position_embeddings, tuple(sorted(eos)))
    max_len = resolve_max_model_len(config, model)  # a bad config fails before any weights load
    if config.tensor_parallel_size == 1:  # today's executor, untouched: no group, ring or collectives
        worker = Worker(config, source, max_len, vocab, model.eos_token_ids)
        executor = make_executor(worker)
    else:
        from conveyor.runtime.worker.tp_executor import start_tensor_parallel

        executor = start_tensor_parallel(config, source, max_len, vocab, model.eos_token_ids)
        worker = executor.worker
    try:
        core = EngineCore(config, executor, model, tokenizer)
    except BaseException:
        executor.close()
        raise
    if config.role != "both":
        try:
            attach_disagg(core, config)
        except BaseException:
            core.close()
            raise
    # What start-up built lives as long as the engine: out of the cycle collector's sight, a full
    # collection mid-run scans only what requests allocate, not the whole heap (a pause of ~0.2 s
    # on the H200, seen as one idle gap in a W1 run). vLLM freezes its heap the same way.
    # EngineCore.close() unfreezes it, so a closed engine's cycles can be collected.
    gc.collect()
    gc.freeze()
    log.info("engine ready", role=config.role, model=core.model_name, device=str(worker.device),
             dtype=str(worker.dtype).removeprefix("torch."), kv_pages=worker.kv_layout.num_pages,
             block_size=config.block_size, max_model_len=max_len, tensor_parallel_size=config.tensor_parallel_size)
    return core


def attach_disagg(core: EngineCore, config: EngineConfig, channel: PrefillChannel | None = None,
                  transport: Transport | None = None) -> None:
    """Give a prefill or decode engine its transport (its KV pool registered) and its half of the flow."""
    region = core.executor.kv_region
    if region is None:
        raise ConfigError(f"--role {config.role} needs an executor whose KV pool a transport can reach")
    if transport is None:
        name = f"conveyor-{config.role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        transport = make_transport(config.kv_transport, name)
    transport.register(region)
    if config.role == "prefill":
        core.disagg = PrefillPusher(transport, region, core.scheduler)
    else:
        core.disagg = DecodeReceiver(transport, region, core.scheduler, channel or HttpPrefillChannel(),
                                     config.kv_lease_s)


def release_device_memory() -> None:
    """After a closed engine is dropped: collect it, and give its device memory back to the driver, so
    the next engine built in this process (a benchmark's next arm) sizes its KV pool from a clean GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
