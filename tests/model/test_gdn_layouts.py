"""Gated DeltaNet layers in and out: the Apriel-H1 layout as Fast-LLM writes 'gdn' layers, the self-contained
native format, and the one-line refusal of MambaInLlama.

Fast-LLM's names are rebuilt here from its public code (`fast_llm/layers/ssm/gdn.py` GatedDeltaNet: rows of
`in_proj_qkvz` [q | k | v | z] of all heads each, `in_proj_ba` [beta | alpha], `convolution` over [q | k | v];
`fast_llm/models/gpt/conversion/apriel.py` GatedDeltaNetConverter: `linear_attn_config` keys), independently of
`pipeline.model.layouts`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pipeline.convert import hybridize
from pipeline.model import HybridForCausalLM
from pipeline.model.config import GDN
from pipeline.model.layouts import APRIEL_H1, MAMBAINLLAMA, NATIVE, LayoutError, load_pretrained, native_state, write_layout

from tests.model.helpers import VOCAB, make_teacher, randomise
from tests.model.test_gdn import randomise_gdn

PLAIN = dict(attention_bias=False, mlp_bias=False, head_dim=16)
TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def gdn_plain_hybrid(seed=0) -> HybridForCausalLM:
    """A, M, G, G: 4 heads, 2 KV heads of 16, no biases (every layout of a GDN layer can hold it)."""
    hybrid = hybridize(make_teacher("llama", seed=seed, **PLAIN), [1], gdn_layers=[2, 3], dt_rank=4)
    randomise(hybrid)
    randomise_gdn(hybrid, seed)
    return hybrid.eval()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("layout", [APRIEL_H1, NATIVE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_equal(layout, dtype, tmp_path):
    hybrid = gdn_plain_hybrid().to(dtype)
    write_layout(hybrid, tmp_path / "out", layout)
    back = load_pretrained(tmp_path / "out")
    assert back.config.layer_types == hybrid.config.layer_types and back.config.gdn_num_kv_heads == 2
    ours, theirs = native_state(hybrid), native_state(back)
    assert ours.keys() == theirs.keys()
    assert [key for key in ours if not torch.equal(ours[key], theirs[key]) or ours[key].dtype != theirs[key].dtype] == []
    assert back.model.layers[2].mixer.A_log.dtype == torch.float32
    if dtype == torch.float32:  # (in bf16 `.to()` also rounded the rotary buffer, which a load computes afresh)
        assert torch.equal(logits(back), logits(hybrid))


def fast_llm_tensors(hybrid: HybridForCausalLM, layer: int) -> dict[str, torch.Tensor]:
    """A Gated DeltaNet layer of ours as Fast-LLM holds it: key_heads = value_heads = 4, k and v per head."""
    mixer = hybrid.model.layers[layer].mixer
    h, g, e = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q, k, v, z, beta, alpha = mixer.in_proj.weight.detach().split([h * e, g * e, g * e, h * e, h, h])

    def per_head(rows):  # (g e, ...) -> (h e, ...): head i reads KV head i // (h / g)
        return rows.reshape(g, 1, e, *rows.shape[1:]).expand(g, h // g, e, *rows.shape[1:]).reshape(h * e, *rows.shape[1:])

    conv_q, conv_k, conv_v = mixer.conv1d.weight.detach().split([h * e, g * e, g * e])
    prefix = f"model.layers.{layer}.mixer."
    return {
        prefix + "in_proj_qkvz.weight": torch.cat([q, per_head(k), per_head(v), z]),
        prefix + "in_proj_ba.weight": torch.cat([beta, alpha]),
        prefix + "convolution.weight": torch.cat([conv_q, per_head(conv_k), per_head(conv_v)]),
        prefix + "A_log": mixer.A_log.detach(), prefix + "dt_bias": mixer.dt_bias.detach(),
        prefix + "norm.weight": mixer.norm.weight.detach(), prefix + "out_proj.weight": mixer.out_proj.weight.detach(),
    }


def write_fast_llm_checkpoint(hybrid, folder, tensors_for_gdn):
    """The Apriel-H1 checkpoint of `hybrid` with its Gated DeltaNet layers' tensors given by the caller."""
    write_layout(hybrid, folder, APRIEL_H1)
    from safetensors.torch import load_file

    tensors = {key: value for key, value in load_file(folder / "model.safetensors").items()
               if not any(key.startswith(f"model.layers.{i}.mixer.") for i in hybrid.config.gdn_layers)}
    for layer in hybrid.config.gdn_layers:
        tensors.update({key: value.contiguous() for key, value in tensors_for_gdn(layer).items()})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    body = json.loads((folder / "config.json").read_text())
    assert body["hybrid_block_layout"] == ["t", "m2", "gdn", "gdn"]
    assert body["linear_attn_config"] == {"gdn_num_value_heads": 4, "gdn_num_key_heads": 4, "gdn_key_head_dim": 16,
                                          "gdn_value_head_dim": 16, "gdn_linear_conv_kernel_size": 4}
    return body


def test_apriel_h1_gdn_checkpoint_from_fast_llms_names(tmp_path):
    hybrid = gdn_plain_hybrid(seed=1)
    write_fast_llm_checkpoint(hybrid, tmp_path / "tied", lambda layer: fast_llm_tensors(hybrid, layer))
    back = load_pretrained(tmp_path / "tied")
    assert back.config.gdn_num_kv_heads == 2  # the shared k and v rows are recognised as the GQA form
    assert all(torch.equal(a, b) for a, b in zip(native_state(back).values(), native_state(hybrid).values()))

    # A trained Fast-LLM layer has a k and a v of its own for every head: read as 4 KV heads, computing the same.
    generator = torch.Generator().manual_seed(2)

    def untied(layer):
        tensors = fast_llm_tensors(hybrid, layer)
        key = f"model.layers.{layer}.mixer.in_proj_qkvz.weight"
        tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=generator)
        return tensors

    write_fast_llm_checkpoint(hybrid, tmp_path / "untied", untied)
    back = load_pretrained(tmp_path / "untied")
    assert back.config.gdn_num_kv_heads == back.config.gdn_num_heads == 4
    # the same computation built by hand: one KV head a head, the rows placed in Fast-LLM's order
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "untied" / "model.safetensors")
    config = hybrid.config.to_dict()
    config.update(gdn_num_kv_heads=4)
    config.pop("transformers_version", None)
    independent = HybridForCausalLM(type(hybrid.config)(**{k: v for k, v in config.items() if k != "model_type"}))
    state = dict(native_state(hybrid))
    for layer in (2, 3):
        prefix = f"model.layers.{layer}.mixer."
        q, k, v, z = saved[prefix + "in_proj_qkvz.weight"].split([64] * 4)
        state[prefix + "in_proj.weight"] = torch.cat([q, k, v, z, saved[prefix + "in_proj_ba.weight"]])
        state[prefix + "conv1d.weight"] = saved[prefix + "convolution.weight"]
    independent.load_state_dict(state, strict=False)
    assert torch.equal(logits(back), logits(independent.eval()))


def test_apriel_h1_gdn_with_shared_queries_is_refused(tmp_path):
    hybrid = gdn_plain_hybrid()
    write_layout(hybrid, tmp_path / "a", APRIEL_H1)
    body = json.loads((tmp_path / "a" / "config.json").read_text())
    body["linear_attn_config"]["gdn_num_key_heads"] = 2
    (tmp_path / "a" / "config.json").write_text(json.dumps(body))
    with pytest.raises(LayoutError, match="2 query/key heads for 4 value heads have no counterpart here"):
        load_pretrained(tmp_path / "a")


def test_mambainllama_refuses_gdn_layers_in_one_line(tmp_path):
    with pytest.raises(LayoutError, match=r"MambaInLlama layout cannot express Gated DeltaNet layers \(layers \[2, 3\]"):
        write_layout(gdn_plain_hybrid(), tmp_path / "out", MAMBAINLLAMA)
    assert list(tmp_path.iterdir()) == []


def test_apriel_h1_refuses_gdn_biases(tmp_path):
    hybrid = hybridize(make_teacher("qwen2", head_dim=16), [], gdn_layers=[1])
    with pytest.raises(LayoutError, match=r"biases \(attention_bias, gdn_in_proj_bias\)"):
        write_layout(hybrid, tmp_path / "out", APRIEL_H1)


def test_self_contained_gdn_checkpoint_loads_without_this_package(tmp_path):
    hybrid = gdn_plain_hybrid(seed=3)
    folder = tmp_path / "portable"
    hybrid.save_pretrained(folder, self_contained=True)
    assert json.loads((folder / "config.json").read_text())["layer_types"][2] == GDN
    torch.save({"tokens": TOKENS, "logits": logits(hybrid)}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["pipeline"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    out = model(expected["tokens"]).logits
assert torch.equal(out, expected["logits"]), (out - expected["logits"]).abs().max()
generated = model.generate(expected["tokens"][:1], max_new_tokens=3, do_sample=False)  # the cache kind is registered
print("ok", type(model.model.layers[2].mixer).__name__, tuple(generated.shape))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok GatedDeltaNetMixer (1, 14)" in result.stdout
