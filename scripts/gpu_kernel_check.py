#!/usr/bin/env python3
"""Which kernel set drifts from transformers? Prefill logits of one prompt, per kernel combination.

    python scripts/gpu_kernel_check.py --preset smollm2-135m

Builds an HF model (bf16, sdpa, random weights of std 0.08), loads the same weights into the
engine, and compares the last-position logits of a prefill for every mix of {torch, FlashInfer}
norm/RoPE/activation kernels and {torch, FlashInfer} attention.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=200)
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from conveyor.model.attention import TorchPagedAttention
    from conveyor.model.kernels import FlashInferKernels, TorchKernels
    from conveyor.model.presets import preset
    from conveyor.runtime import LLM, SamplingParams

    cfg = AutoConfig.for_model(**preset(args.preset))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    hf = hf.cuda().eval()
    prompt = torch.randint(3, 30000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        ref32 = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).cuda()(
            torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    print(f"{args.preset}: HF bf16 vs HF fp32: max |dlogit| {(ref - ref32).abs().max():.4f} "
          f"(logit std {ref32.std():.3f})")

    llm = LLM(tmp, max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.3)
    core = llm.core
    captured: list[torch.Tensor] = []
    original = core.executor.worker.model.compute_logits
    core.executor.worker.model.compute_logits = lambda h: captured.append(original(h)) or captured[-1]
    m = core.executor.worker.model.config
    fi_attn = core.executor.worker.runner.backend
    for kernels_name in ("flashinfer", "torch"):
        for attn_name in ("flashinfer", "torch"):
            kernels_cls = FlashInferKernels if kernels_name == "flashinfer" else TorchKernels
            core.executor.worker.model.kernels = kernels_cls(m.rope, m.head_dim, 1025, core.executor.worker.device)
            core.executor.worker.runner.backend = fi_attn if attn_name == "flashinfer" else TorchPagedAttention(
                m.num_heads, m.num_kv_heads, m.head_dim)
            captured.clear()
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            got = captured[0][-1].float()
            print(f"  kernels={kernels_name:10} attention={attn_name:10} vs HF bf16 {(got - ref).abs().max():.4f}"
                  f"  vs HF fp32 {(got - ref32).abs().max():.4f}  argmax {'=' if got.argmax() == ref.argmax() else '!'}")


if __name__ == "__main__":
    main()
