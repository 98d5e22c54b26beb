"""Generation throughput of a checkpoint, measured by the project's engine.

Teacher and hybrids go through the same `GenerationEngine` (a teacher as an all-attention hybrid), so
their ratio compares the architectures. On CUDA the engine's decode step is a CUDA graph with the fast
kernels; on CPU it runs eagerly (the CPU figures of the demo compare tiny models and say little about
GPU serving). Greedy, a fixed number of new tokens, random prompt tokens.

The prompt batch is prefilled in as few forwards as fit `prefill_tokens` prompt tokens each (the whole batch
at short prompts, one row at a time at 16k), so that the ratio measures the model: a row-by-row prefill of a
short-prompt batch is bound by kernel launches and hides the hybrids' decode behind them (on SmolLM2 at
batch 64 it is most of a 2-4 s call: commit 587f8eb).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.evaluate.engine import GenerationEngine
from pipeline.evaluate.quality import model_device


@dataclass
class Throughput:
    batch_size: int
    prompt_length: int
    new_tokens: int
    prefill_s: float  # median over repeats
    decode_s: float
    tokens_per_s: float  # generated tokens (batch x new tokens) / (prefill + decode)
    decode_tokens_per_s: float
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def as_hybrid(model: nn.Module):
    """The engine runs `HybridForCausalLM`; a transformers teacher converts with zero Mamba layers."""
    from pipeline.convert import hybridize
    from pipeline.model import HybridForCausalLM

    return model if isinstance(model, HybridForCausalLM) else hybridize(model, [])


@torch.no_grad()
def generation_throughput(
    model: nn.Module,
    *,
    batch_size: int = 8,
    prompt_length: int = 64,
    new_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
    prefill_tokens: int = 16384,
) -> Throughput:
    """Median over `repeats` timed generations, after one untimed warm-up generation. The prefill runs
    `max(1, prefill_tokens // prompt_length)` rows per forward (at most the batch)."""
    hybrid = as_hybrid(model).eval()
    device = model_device(hybrid)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, hybrid.config.vocab_size, (batch_size, prompt_length), generator=generator).to(device)
    rows = max(1, min(batch_size, prefill_tokens // max(prompt_length, 1)))
    engine = GenerationEngine(hybrid, batch_size=batch_size, max_length=prompt_length + new_tokens, prefill_batch=rows)
    engine.generate(prompt, max_new_tokens=min(new_tokens, 4))
    runs = sorted((engine.generate(prompt, max_new_tokens=new_tokens) for _ in range(repeats)),
                  key=lambda r: r.prefill_s + r.decode_s)
    median = runs[len(runs) // 2]
    return Throughput(batch_size, prompt_length, new_tokens, median.prefill_s, median.decode_s,
                      median.tokens_per_s, median.decode_tokens_per_s, str(device))


__all__ = ["Throughput", "as_hybrid", "generation_throughput"]
