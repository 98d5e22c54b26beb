"""Tiny teachers of every supported family, built from transformers configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    # Llama's attention_bias puts biases on q, k, v and o; mlp_bias on the MLP.
    "llama": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    # Mistral: no biases, explicit head_dim, a sliding window longer than any test sequence.
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=512, head_dim=32)),
    # Qwen2: biases on q, k, v only.
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(head_dim=32)),
}


def make_teacher(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    model_cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**BASE, **extra, **overrides}))
    randomise(model)
    return model.eval()


@torch.no_grad()
def randomise(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Non-trivial values everywhere (biases, norms, the pad embedding), so no bug hides behind a zero."""
    for name, parameter in model.named_parameters():
        if name.endswith("A_log"):
            continue
        if "norm" in name:
            parameter.copy_(1.0 + scale * torch.randn_like(parameter))
        elif name.endswith("bias"):
            parameter.copy_(scale * torch.randn_like(parameter))
