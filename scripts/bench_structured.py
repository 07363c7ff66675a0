#!/usr/bin/env python3
"""Structured outputs: what the grammar mask costs per step, and what it does to throughput.

Part 1 (``--mask-only`` runs just this): host time to fill the token bitmask per decode step, at
batch 1 and 64, for xgrammar (what the engine uses) and llguidance (if installed), walking a
valid JSON document of the bench schema token by token with the model's tokenizer.

Part 2: a W1-style offline run (random prompt ids, lengths uniform in --input-len/--output-len)
twice: no constraint (ignore EOS), and the bench JSON schema on every request. The schema asks
for at least 1000 array items, so no request can finish before max_tokens: both runs generate
the same number of tokens and the difference is the mask's cost (fill on the host, apply on the
device, and any wait of the sampler for its mask).

    # CPU smoke run (tiny workload, default model):
    python scripts/bench_structured.py --num-requests 16 --input-len 16:64 --output-len 32:64 --max-num-seqs 16
    # GPU (lead's machine): batch 1 and 64 mask cost, then W1 with and without the schema
    python scripts/bench_structured.py --model default --num-requests 256 --input-len 100:1024 \
        --output-len 100:1024 --max-num-seqs 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.engine_args import add_engine_args, engine_config, parse_range  # noqa: E402
from conveyor.scheduler import SamplingParams, StructuredSpec  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": ["alpha", "beta", "gamma"]},
                       "score": {"type": "integer", "minimum": 0, "maximum": 100},
                       "note": {"type": "string", "maxLength": 12}},
        "required": ["name", "score", "note"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
# xgrammar's JSON without free whitespace uses json.dumps's default separators.
DOC = json.dumps({"items": [{"name": n, "score": s, "note": f"item {i}"} for i, (n, s) in
                            enumerate([("alpha", 7), ("beta", 42), ("gamma", 100)] * 4)]})[:-2]


def mask_cost(tokenizer, vocab: int, batches: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """ms per step to fill the bitmask of ``b`` rows (each row its own matcher)."""
    import torch

    ids = tokenizer.encode(DOC, add_special_tokens=False)
    out: dict[str, dict[int, float]] = {}
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    from conveyor.runtime.worker.grammar_mask import PARALLEL_FILL_ROWS

    out["xgrammar"] = {}
    batch_matcher = xgr.BatchGrammarMatcher()
    for b in batches:
        ms = [xgr.GrammarMatcher(compiled) for _ in range(b)]
        mask = torch.full((b, (vocab + 31) // 32), -1, dtype=torch.int32)
        t = 0.0
        for tid in ids:
            t0 = time.perf_counter()
            if b >= PARALLEL_FILL_ROWS:  # what GrammarBatch.fill does
                batch_matcher.batch_fill_next_token_bitmask(ms, mask, list(range(b)))
            else:
                for row, m in enumerate(ms):
                    m.fill_next_token_bitmask(mask, row)
            t += time.perf_counter() - t0
            for m in ms:
                assert m.accept_token(tid)
        out["xgrammar"][b] = round(t / len(ids) * 1e3, 4)
    try:
        import llguidance as llg
        import llguidance.hf
        import llguidance.torch as lt
    except ImportError:
        return out
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llg.LLMatcher.grammar_from_json_schema(SCHEMA)
    executor = llg.LLExecutor()
    out["llguidance"] = {}
    for b in batches:
        ms = [llg.LLMatcher(lltok, grammar) for _ in range(b)]
        mask = lt.allocate_token_bitmask(b, vocab)
        t = 0.0
        for tid in ids:
            t0 = time.perf_counter()
            if b == 1:
                lt.fill_next_token_bitmask(ms[0], mask, 0)
            else:
                lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)], mask)
            t += time.perf_counter() - t0
            for m in ms:
                assert m.consume_token(tid), m.get_error()
        out["llguidance"][b] = round(t / len(ids) * 1e3, 4)
    return out


def run(config, prompts, out_lens, constrained: bool) -> dict:
    import torch

    from conveyor.runtime import LLM
    from conveyor.runtime.build import release_device_memory
    from conveyor.runtime.engine.step_stats import OverlapSummary

    llm = LLM(**{k: getattr(config, k) for k in config.__struct_fields__})
    core = llm.core
    spec = StructuredSpec(kind="json_schema", value=json.dumps(SCHEMA))
    params = [SamplingParams(max_tokens=n, temperature=0, structured=spec) if constrained else
              SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in out_lens]
    llm.generate([p[:16] for p in prompts[:4]], [SamplingParams(max_tokens=8, temperature=0,
                 structured=spec if constrained else None)] * 4, use_tqdm=False)  # warm-up, compile
    core.grammar_mask_s, core.grammar_mask_batches = 0.0, 0
    core.step_records = []
    if core.executor.worker.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    records, core.step_records = core.step_records, None
    overlap = OverlapSummary.of(records)
    n_out = sum(len(o.token_ids) for o in outs)
    result = {
        "constrained": constrained, "output_tokens": n_out, "wall_s": round(wall, 3),
        "output_tok_s": round(n_out / wall, 1), "steps": len(records),
        "finish_reasons": sorted({o.finish_reason for o in outs}),
        "mask_fill_ms_per_batch": round(core.grammar_mask_s / max(core.grammar_mask_batches, 1) * 1e3, 4),
        "device_idle_fraction": round(overlap.idle_fraction, 4), "mean_cpu_ms": round(overlap.mean_cpu_ms, 3),
        "mean_device_ms": round(overlap.mean_device_ms, 3),
    }
    if constrained:
        bad = [o for o in outs if not _valid_prefix(o.text)]
        result["invalid_outputs"] = len(bad)
    llm.close()
    del llm, core, outs
    release_device_memory()  # the next arm sizes its KV pool from a clean GPU
    return result


def _valid_prefix(text: str) -> bool:
    return text.startswith('{"items": [')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=parse_range, default=(100, 1024))
    parser.add_argument("--output-len", type=parse_range, default=(100, 1024))
    parser.add_argument("--mask-only", action="store_true", help="only part 1 (no model run)")
    add_engine_args(parser)  # its --seed also seeds the workload
    args = parser.parse_args()
    config = engine_config(args)

    from conveyor.model import resolve_model
    from conveyor.model.tokenizer import load_tokenizer

    source = resolve_model(config.model, config.load_format)
    tok_dir = config.tokenizer or source.tokenizer_dir
    if tok_dir is None:
        print("this model has no tokenizer: pass --tokenizer DIR", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(tok_dir)
    print(json.dumps({"mask_fill_ms_per_step": mask_cost(tokenizer, len(tokenizer), (1, 64))}), flush=True)
    if args.mask_only:
        return 0
    rng = random.Random(args.seed)
    vocab = len(tokenizer)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*args.input_len))] for _ in range(args.num_requests)]
    out_lens = [rng.randint(*args.output_len) for _ in range(args.num_requests)]
    results = [run(config, prompts, out_lens, constrained) for constrained in (False, True)]
    for r in results:
        print(json.dumps(r), flush=True)
    free, schema = results
    print(json.dumps({"schema_vs_none_throughput": round(schema["output_tok_s"] / free["output_tok_s"], 4),
                      "same_output_tokens": schema["output_tokens"] == free["output_tokens"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
