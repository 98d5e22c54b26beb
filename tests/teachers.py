"""A tiny saved teacher for stage and flow tests: a random 4-layer Llama (GQA) with the demo tokenizer."""

from __future__ import annotations

from pathlib import Path


def save_tiny_teacher(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
