"""Generation throughput of a checkpoint: tokens/s at a given batch, prompt and output length.

This measures `generate()` with the model's own caches (K/V for attention, conv + SSM state for Mamba),
greedy, a fixed number of new tokens (no early stop), on random prompt tokens. Teacher and hybrids are
measured by the same code on the same device, so their ratio compares the architectures; the GPU engine
with preallocated caches and CUDA graphs is `benchmarks/` work (issue: GPU fast path).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.evaluate.quality import model_device


@dataclass
class Throughput:
    batch_size: int
    prompt_length: int
    new_tokens: int
    seconds: float  # median wall time of one generate() call
    tokens_per_s: float  # generated tokens (batch x new tokens) per second
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generation_throughput(
    model: nn.Module,
    *,
    batch_size: int = 8,
    prompt_length: int = 64,
    new_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
) -> Throughput:
    """Median over `repeats` timed generate() calls, after one untimed warm-up call."""
    model.eval()
    device = model_device(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (batch_size, prompt_length), generator=generator).to(device)
    mask = torch.ones_like(prompt)
    settings = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )
    model.generate(prompt, attention_mask=mask, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, **settings)
        _sync(device)
        times.append(time.perf_counter() - start)
        if out.shape[1] != prompt_length + new_tokens:
            raise RuntimeError(f"generate() stopped early: {out.shape[1] - prompt_length} of {new_tokens} tokens")
    seconds = sorted(times)[len(times) // 2]
    return Throughput(batch_size, prompt_length, new_tokens, seconds, batch_size * new_tokens / seconds, str(device))


__all__ = ["Throughput", "generation_throughput"]
