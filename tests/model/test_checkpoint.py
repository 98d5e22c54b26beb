"""pipeline.model.checkpoint and the pattern helpers of pipeline.model.config: what a checkpoint's files say."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from pipeline.model.checkpoint import (
    SUPPORTED_ARCHITECTURES,
    TEACHER_ARCHITECTURES,
    TOKENIZER_FILES,
    config_files,
    folder_layer_kinds,
    has_experts,
    layer_kinds_of,
    layer_of,
)
from pipeline.model.config import ATTENTION, GDN, IDENTITY, MAMBA, HybridConfig, attention_pattern, pattern_of
from pipeline.model.layouts import LayoutError


def write(folder, config, mamba=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if mamba is not None:
        (folder / "mamba_config.json").write_text(json.dumps(mamba))
    return folder


MIXED = [ATTENTION, MAMBA, GDN, ATTENTION, IDENTITY, MAMBA]


def test_native_folder_with_mixed_kinds(tmp_path):
    folder = write(tmp_path / "h", {"model_type": HybridConfig.model_type, "num_hidden_layers": 6,
                                    "layer_types": MIXED})
    assert folder_layer_kinds(folder) == MIXED
    assert layer_kinds_of(str(folder)) == {"attention": [0, 3], "mamba": [1, 5], "gdn": [2]}  # identity: none
    assert pattern_of(folder_layer_kinds(folder)) == "AMGAIM"


def test_apriel_and_mambainllama_folders(tmp_path):
    apriel = write(tmp_path / "a", {"model_type": "apriel_hybrid_ssm", "num_hidden_layers": 4,
                                    "hybrid_block_layout": ["t", "m2", "gdn", "t"]})
    assert folder_layer_kinds(apriel) == [ATTENTION, MAMBA, GDN, ATTENTION]
    # MambaInLlama: a LlamaConfig plus mamba_config.json; every layer not in attn_layers is Mamba
    mil = write(tmp_path / "m", {"model_type": "llama", "num_hidden_layers": 4}, {"n_layer": 4, "attn_layers": [0, 2]})
    assert layer_kinds_of(mil) == {"attention": [0, 2], "mamba": [1, 3], "gdn": []}
    # without mamba_config.json the same config.json is a teacher: all attention
    (mil / "mamba_config.json").unlink()
    assert layer_kinds_of(mil) == {"attention": [0, 1, 2, 3], "mamba": [], "gdn": []}


def test_unknown_kinds_raise(tmp_path):
    folder = write(tmp_path / "h", {"model_type": HybridConfig.model_type, "layer_types": [ATTENTION, "moe"]})
    with pytest.raises(LayoutError, match="moe"):
        folder_layer_kinds(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError):
        layer_kinds_of(bad)


def test_config_files_reads_config_first_and_mamba_only_when_present():
    files = {"config.json": b'{"num_hidden_layers": 2}', "mamba_config.json": '{"attn_layers": [1]}'}
    reads = []

    def read(name):
        reads.append(name)
        return files[name]

    assert config_files(read, files.__contains__) == ({"num_hidden_layers": 2}, {"attn_layers": [1]})
    assert reads == ["config.json", "mamba_config.json"]
    del files["mamba_config.json"]
    assert config_files(read, files.__contains__) == ({"num_hidden_layers": 2}, None)


def test_has_experts_on_dicts_and_config_objects():
    assert not has_experts({"num_hidden_layers": 2})
    assert not has_experts({"num_local_experts": 0, "num_experts": None})
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        assert has_experts({key: 8})
    assert not has_experts(LlamaConfig(num_hidden_layers=2))
    config = LlamaConfig(num_hidden_layers=2)
    config.num_local_experts = 8
    assert has_experts(config)


def test_layer_of():
    assert layer_of("model.layers.12.mixer.in_proj.weight") == 12
    assert layer_of("model.layers.3.input_layernorm.weight") == 3
    assert layer_of("model.layers.3") is None  # no part after the index
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None
    assert layer_of("encoder.layers.1.mixer.weight") is None


def test_supported_architectures_are_the_conversion_table():
    from pipeline.convert import SUPPORTED, TEACHER_CLASSES
    from pipeline.model import HybridForCausalLM
    from pipeline.plan import SUPPORTED_ARCHITECTURES as PLANNED

    assert tuple(cls.__name__ for cls in TEACHER_CLASSES) == TEACHER_ARCHITECTURES
    assert SUPPORTED_ARCHITECTURES == (*TEACHER_ARCHITECTURES, HybridForCausalLM.__name__) == PLANNED
    assert SUPPORTED == "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, HybridForCausalLM"


def test_tokenizer_files_are_one_tuple():
    from pipeline import plan
    from pipeline.stages import start

    assert plan.TOKENIZER_FILES is start.TOKENIZER_FILES is TOKENIZER_FILES
    assert "tokenizer.json" in TOKENIZER_FILES


def test_patterns():
    config = HybridConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                          layer_types=["attention", "mamba", "gdn", "attention", "identity", "mamba"])
    assert config.layer_pattern == pattern_of(MIXED) == "AMGAIM"
    assert attention_pattern(3) == "AAA" and attention_pattern(0) == ""
    with pytest.raises(KeyError):
        pattern_of([ATTENTION, "sliding_attention"])
    assert pattern_of([ATTENTION, "sliding_attention"], other="I") == "AI"  # the evaluate stage's reading
