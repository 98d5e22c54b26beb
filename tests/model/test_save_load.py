"""Checkpoints are config.json + model.safetensors, and load back through the Auto classes."""

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pipeline.model  # noqa: F401  (registers the Auto classes)
from pipeline.convert import hybridize
from pipeline.model import HybridConfig, HybridForCausalLM

from tests.model.helpers import VOCAB, make_teacher, randomise


def test_save_reload_with_auto_classes_same_logits(tmp_path):
    hybrid = hybridize(make_teacher("llama"), [0, 2], identity_layers=[3], gqa_expansion="head_aligned")
    randomise(hybrid)
    hybrid.save_pretrained(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in written and "config.json" in written
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in written), written
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == ["linear_attention", "full_attention", "linear_attention", "mlp"]
    assert saved["mamba_gqa_expansion"] == "head_aligned"

    assert isinstance(AutoConfig.from_pretrained(tmp_path), HybridConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridForCausalLM)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hybrid.eval()(ids).logits)
    # SSM parameters stay fp32 through a bfloat16 load.
    low = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = low.model.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16


def test_to_bfloat16_keeps_ssm_parameters_fp32():
    hybrid = hybridize(make_teacher("mistral"), [1]).to(torch.bfloat16)
    mixer = hybrid.model.layers[1].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert hybrid(ids).logits.dtype == torch.bfloat16
