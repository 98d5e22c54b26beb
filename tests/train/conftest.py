"""Tiny Llama models and batches for the training-loop tests (hidden 32, 2 layers, vocab 64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def _tiny_llama(seed: int, attention_dropout: float = 0.0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_dropout=attention_dropout,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llama() -> Callable[..., LlamaForCausalLM]:
    """Factory: tiny_llama(seed, attention_dropout=0.0) -> a fresh, deterministic LlamaForCausalLM."""
    return _tiny_llama


def _random_batches(count: int, batch_size: int = 4, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(0, VOCAB, (batch_size, length), generator=generator)  # (B, T)
        attention_mask = torch.ones(batch_size, length, dtype=torch.long)  # (B, T)
        attention_mask[0, length - 3 :] = 0  # one right-padded row
        loss_mask = attention_mask.bool()
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
    return batches


@pytest.fixture
def random_batches() -> Callable[..., list[dict[str, torch.Tensor]]]:
    """Factory: random_batches(count, batch_size=4, length=16, seed=0) -> list of batch dicts."""
    return _random_batches
