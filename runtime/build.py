"""An engine for a config: the model resolved, the tokenizer, a device worker and its executor, and
the engine core over them. Entry points (``AsyncEngine``, ``LLM``, tools, scripts) build through here."""

from __future__ import annotations

import structlog

from conveyor.model import resolve_model
from conveyor.model.tokenizer import load_tokenizer
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
    log.info("engine ready", model=core.model_name, device=str(worker.device),
             dtype=str(worker.dtype).removeprefix("torch."), kv_pages=worker.kv_layout.num_pages,
             block_size=config.block_size, max_model_len=max_len, tensor_parallel_size=config.tensor_parallel_size)
    return core


def release_device_memory() -> None:
    """After a closed engine is dropped: collect it, and give its device memory back to the driver, so
    the next engine built in this process (a benchmark's next arm) sizes its KV pool from a clean GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
