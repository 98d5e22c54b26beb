"""A checkpoint as its files describe it, read without loading its weights.

One definition each of: the tokenizer file names, the teacher architectures this project converts, the
mixture-of-experts check, the layer index in a state-dict key, and the per-layer kinds of a checkpoint
folder (from its config.json and, for MambaInLlama, its mamba_config.json). The layout rules themselves
(which config field declares the kinds) live in `pipeline.model.layouts.layer_kinds`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.model.config import ATTENTION, GDN, MAMBA

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # any one: it has a tokenizer
# transformers classes a teacher may be (their names: `pipeline.convert` looks the classes up by them).
TEACHER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# ... and a hybrid of ours, which progressive steps convert further; in this order in every message.
SUPPORTED_ARCHITECTURES = (*TEACHER_ARCHITECTURES, "HybridForCausalLM")
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # Mixtral, Qwen-MoE, DeepSeek


def has_experts(config: Mapping | object) -> bool:
    """True if a config (a config.json body or a transformers config object) declares mixture-of-experts
    layers: any of EXPERT_FIELDS set to a truthy value. Absent, None and 0 all mean dense."""
    if isinstance(config, Mapping):
        return any(config.get(key) for key in EXPERT_FIELDS)
    return any(getattr(config, key, None) for key in EXPERT_FIELDS)


def layer_of(key: str) -> int | None:
    """The layer index of a state-dict key `model.layers.<i>.<rest>` (at least one part after the index);
    None for any other key (embeddings, final norm, lm_head)."""
    parts = key.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] else None


def config_files(read: Callable[[str], str | bytes], has: Callable[[str], bool]) -> tuple[dict, dict | None]:
    """(config.json, mamba_config.json or None when `has` says there is none), parsed from `read(name)`.
    config.json is read first; unreadable or invalid JSON raises what `read` or `json.loads` raises."""
    from pipeline.model.layouts import MIL_CONFIG

    config = json.loads(read("config.json"))
    return config, json.loads(read(MIL_CONFIG)) if has(MIL_CONFIG) else None


def folder_layer_kinds(folder: str | os.PathLike) -> list[str]:
    """The kind of each layer (ATTENTION, MAMBA, GDN, IDENTITY) of a checkpoint folder, from its config
    files alone (`layouts.layer_kinds`: raises LayoutError for kinds not known here)."""
    from pipeline.model.layouts import layer_kinds

    folder = Path(folder)
    return layer_kinds(*config_files(lambda name: (folder / name).read_text(), lambda name: (folder / name).is_file()))


def layer_kinds_of(folder: str | os.PathLike) -> dict[str, list[int]]:
    """{"attention": [...], "mamba": [...], "gdn": [...]}: the layer indices of a checkpoint folder by kind,
    ascending (identity layers are in none of them)."""
    kinds = folder_layer_kinds(folder)
    return {name: [i for i, kind in enumerate(kinds) if kind == value]
            for name, value in (("attention", ATTENTION), ("mamba", MAMBA), ("gdn", GDN))}


__all__ = ["EXPERT_FIELDS", "SUPPORTED_ARCHITECTURES", "TEACHER_ARCHITECTURES", "TOKENIZER_FILES", "config_files",
           "folder_layer_kinds", "has_experts", "layer_kinds_of", "layer_of"]
