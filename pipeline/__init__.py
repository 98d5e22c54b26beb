"""hybrid-distill: turn a transformer LLM into an attention/Mamba hybrid by distillation.

Importing `pipeline.model` (or anything that uses it) registers `HybridConfig` / `HybridForCausalLM`
with transformers' Auto classes. The package root imports nothing heavy, so `pipeline.store` and
`pipeline.tracking` stay importable without torch.
"""

__version__ = "0.1.0"
