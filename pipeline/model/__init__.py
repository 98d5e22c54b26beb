"""The hybrid model: config, mixers, cache, kernel dispatch; registered with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.model.config import (
    ATTENTION,
    GDN,
    IDENTITY,
    LAYER_KINDS,
    MAMBA,
    HybridConfig,
    HybridConfigError,
    canonical_layer_types,
)
from pipeline.model.modeling import HybridForCausalLM, HybridModel, cache_of


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the hybrid (idempotent)."""
    try:
        AutoConfig.register(HybridConfig.model_type, HybridConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM)
    except ValueError:
        pass


register()

__all__ = [
    "ATTENTION",
    "GDN",
    "IDENTITY",
    "LAYER_KINDS",
    "MAMBA",
    "HybridConfig",
    "HybridConfigError",
    "HybridForCausalLM",
    "HybridModel",
    "cache_of",
    "canonical_layer_types",
    "register",
]
