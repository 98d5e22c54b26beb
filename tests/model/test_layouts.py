"""Apriel-H1 and MambaInLlama checkpoints in and out, self-contained exports, the export command.

Their layouts are rebuilt here from the names their public code documents (ServiceNow Fast-LLM
`fast_llm_external_models/apriel_hybrid_ssm`, jxiw/MambaInLlama `mamba/hybrid_wrapper.py` and
`mamba_inference/hybrid_wrapper.py`, qwerkyai/qwerky-vllm-models `modeling/model.py` load_weights and
`modeling/mixer.py`), independently of `pipeline.model.layouts`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, MistralConfig

from pipeline.convert import hybridize
from pipeline.export import main as export_main
from pipeline.model import HybridForCausalLM
from pipeline.model.layouts import (
    APRIEL_H1,
    LAYOUTS,
    MAMBAINLLAMA,
    LayoutError,
    detect_layout,
    load_pretrained,
    mambainllama_plugin_notes,
    native_state,
    write_layout,
)
from pipeline.model.mixers import gqa_expansion_index

from tests.model.helpers import VOCAB, make_teacher, randomise

# A Llama without biases whose dt_rank is MambaInLlama's "auto" (ceil(64 / 16) = 4): every layout can hold it.
PLAIN = dict(attention_bias=False, mlp_bias=False, head_dim=16)
TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def plain_hybrid(mamba_layers=(1, 2), family="llama", **options) -> HybridForCausalLM:
    extra = PLAIN if family == "llama" else {"head_dim": 16}
    hybrid = hybridize(make_teacher(family, **extra), list(mamba_layers), dt_rank=4, **options)
    randomise(hybrid)  # non-trivial conv, dt, A_log, D everywhere
    return hybrid


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


# --- ours -> theirs -> ours ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_bit_equal(layout, tmp_path):
    hybrid = plain_hybrid()
    notes = write_layout(hybrid, tmp_path / "out", layout)
    assert detect_layout(tmp_path / "out") == layout
    back = load_pretrained(tmp_path / "out")
    assert isinstance(back, HybridForCausalLM)
    assert back.config.layer_types == hybrid.config.layer_types
    ours, theirs = native_state(hybrid), native_state(back)
    assert ours.keys() == theirs.keys()
    unequal = [key for key in ours if not torch.equal(ours[key], theirs[key]) or ours[key].dtype != theirs[key].dtype]
    assert unequal == []
    assert torch.equal(logits(back), logits(hybrid))
    assert notes == []  # dt_rank = ceil(hidden / 16): nothing keeps the vLLM plugin from it


def test_round_trip_in_bfloat16_with_tied_embeddings(tmp_path):
    hybrid = hybridize(make_teacher("llama", tie_word_embeddings=True, **PLAIN), [0, 3], dt_rank=4)
    randomise(hybrid)
    hybrid.to(torch.bfloat16)
    for layout in (APRIEL_H1, MAMBAINLLAMA):
        write_layout(hybrid, tmp_path / layout, layout)
        back = load_pretrained(tmp_path / layout)
        assert back.dtype == torch.bfloat16 and back.model.layers[0].mixer.A_log.dtype == torch.float32
        ours, theirs = native_state(hybrid), native_state(back)
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


# --- theirs (built from their documented names) -> ours --------------------------------------------

def _fresh_mamba_weights(config, generator):
    """The weights MIL initialisation leaves random: z rows, dt down/up projections, conv, A_log, D."""
    d_inner, hidden, rank, xb = config.mamba_d_inner, config.hidden_size, config.mamba_dt_rank, config.mamba_d_xb
    def rand(*shape):
        return 0.2 * torch.randn(*shape, generator=generator)
    return {
        "z": rand(d_inner, hidden), "dt_down": rand(rank, hidden), "dt_up": rand(d_inner, rank),
        "dt_bias_theirs": rand(d_inner) - 3.0, "conv": rand(d_inner, 1, config.mamba_d_conv), "conv_bias": rand(d_inner),
        "conv_xb": rand(xb, 1, config.mamba_d_conv), "conv_bias_xb": rand(xb),
        "A_log": torch.log(torch.rand(d_inner, config.mamba_d_state, generator=generator) * 4 + 0.5), "D": rand(d_inner) + 1,
    }


def _set_ours(hybrid, layer, fresh, conv=None, conv_bias=None):
    """Our own conversion of the same weights: their dt bias counts twice, so ours is double."""
    mixer = hybrid.model.layers[layer].mixer
    with torch.no_grad():
        mixer.in_proj.weight[: mixer.d_inner].copy_(fresh["z"])
        mixer.dt_in_proj.weight.copy_(fresh["dt_down"])
        mixer.dt_proj.weight.copy_(fresh["dt_up"])
        mixer.dt_proj.bias.copy_(2 * fresh["dt_bias_theirs"])
        mixer.conv1d.weight.copy_(fresh["conv"] if conv is None else conv)
        mixer.conv1d.bias.copy_(fresh["conv_bias"] if conv_bias is None else conv_bias)
        mixer.A_log.copy_(fresh["A_log"])
        mixer.D.copy_(fresh["D"])


def test_mambainllama_checkpoint_from_its_documented_names(tmp_path):
    """A MIL checkpoint as MambaInLlama's trainer saves it (split projections, init_with_kqvo from the
    teacher's attention, mamba_config.json as train_hybrid.py writes it) gives our conversion's logits."""
    teacher = make_teacher("llama", **PLAIN)
    config, ssm_layers = teacher.config, [0, 2]
    theirs = {key: value.clone() for key, value in teacher.state_dict().items()}
    ours = hybridize(teacher, ssm_layers, dt_rank=math.ceil(config.hidden_size / 16))
    generator = torch.Generator().manual_seed(1)
    for layer in ssm_layers:
        fresh = _fresh_mamba_weights(ours.config, generator)
        attention = {name: theirs.pop(f"model.layers.{layer}.self_attn.{name}_proj.weight") for name in "qkvo"}
        prefix = f"model.layers.{layer}.mamba."
        theirs.update({
            prefix + "in_proj_x.weight": attention["v"], prefix + "B_proj.weight": attention["k"],
            prefix + "C_proj.weight": attention["q"], prefix + "out_proj.weight": attention["o"],
            prefix + "in_proj_z.weight": fresh["z"], prefix + "dt_proj_down.weight": fresh["dt_down"],
            prefix + "dt_proj.weight": fresh["dt_up"], prefix + "dt_proj.bias": fresh["dt_bias_theirs"],
            prefix + "conv1d.weight": fresh["conv"], prefix + "conv1d.bias": fresh["conv_bias"],
            prefix + "A_log": fresh["A_log"], prefix + "D": fresh["D"],
        })
        _set_ours(ours, layer, fresh)
    folder = tmp_path / "mil"
    teacher.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in theirs.items()}, folder / "model.safetensors")
    (folder / "mamba_config.json").write_text(json.dumps({
        "d_model": config.hidden_size, "ssm_cfg": {"expand": 1}, "rms_norm_eps": config.rms_norm_eps,
        "d_inner": config.num_attention_heads * config.head_dim, "d_xb": config.num_key_value_heads * config.head_dim,
        "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
        "n_layer": config.num_hidden_layers, "attn_layers": [i for i in range(4) if i not in ssm_layers],
    }))
    imported = load_pretrained(folder)
    assert imported.config.layer_types == ours.config.layer_types
    torch.testing.assert_close(logits(imported), logits(ours), rtol=0, atol=1e-6)


@pytest.mark.parametrize("repeat_kv_before_conv", [True, False])
def test_apriel_h1_checkpoint_from_its_documented_names(tmp_path, repeat_kv_before_conv):
    """An Apriel-H1 checkpoint (MistralConfig + hybrid_block_layout "t"/"m2" + ssm_cfg; "m2" mixers named
    mixer.{in_proj, dt_in_proj, dt_proj, conv1d, A_log, D, out_proj}) gives our conversion's logits; with
    repeat_kv_before_conv=false its conv runs on the d_xb channels before the chunk repeat."""
    teacher = make_teacher("mistral", head_dim=16)
    config, mamba_layers = teacher.config, [1, 3]
    ours = hybridize(teacher, mamba_layers, dt_rank=8)
    d_inner, d_xb = ours.config.mamba_d_inner, ours.config.mamba_d_xb
    theirs = {key: value.clone() for key, value in teacher.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    for layer in mamba_layers:
        fresh = _fresh_mamba_weights(ours.config, generator)
        attention = {name: theirs.pop(f"model.layers.{layer}.self_attn.{name}_proj.weight") for name in "qkvo"}
        prefix = f"model.layers.{layer}.mixer."
        conv = fresh["conv"] if repeat_kv_before_conv else fresh["conv_xb"]
        conv_bias = fresh["conv_bias"] if repeat_kv_before_conv else fresh["conv_bias_xb"]
        theirs.update({
            prefix + "in_proj.weight": torch.cat([fresh["z"], attention["v"], attention["k"], attention["q"]]),
            prefix + "dt_in_proj.weight": fresh["dt_down"], prefix + "dt_proj.weight": fresh["dt_up"],
            prefix + "dt_proj.bias": fresh["dt_bias_theirs"], prefix + "conv1d.weight": conv,
            prefix + "conv1d.bias": conv_bias, prefix + "A_log": fresh["A_log"], prefix + "D": fresh["D"],
            prefix + "out_proj.weight": attention["o"],
        })
        index = gqa_expansion_index(d_inner, d_xb, ours.config.mamba_d_state)  # repeat_kv of d_state groups
        _set_ours(ours, layer, fresh, conv=conv if repeat_kv_before_conv else conv[index],
                  conv_bias=conv_bias if repeat_kv_before_conv else conv_bias[index])
    folder = tmp_path / "apriel"
    body = MistralConfig(**{k: v for k, v in config.to_dict().items() if k not in ("architectures",)}).to_dict()
    body.update(model_type="apriel_hybrid_ssm", architectures=["AprielHybridSSMForCausalLM"],
                hybrid_block_layout=["m2" if i in mamba_layers else "t" for i in range(4)],
                ssm_cfg={"d_inner": d_inner, "d_xb": d_xb, "d_state": 16, "dt_rank": 8, "d_conv": 4, "expand": 1,
                         "repeat_kv_before_conv": repeat_kv_before_conv, "conv_bias": True, "bias": False,
                         "dt_proj_bias": True, "n_qk_heads": 32, "n_v_heads": 32, "chunk_size": 128,
                         "activation": "identity"})
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(body))
    save_file({k: v.contiguous() for k, v in theirs.items()}, folder / "model.safetensors")
    imported = load_pretrained(folder)
    assert imported.config.sliding_window == config.sliding_window
    torch.testing.assert_close(logits(imported), logits(ours), rtol=0, atol=1e-6)


# --- what the layouts cannot express -----------------------------------------------------------

@pytest.mark.parametrize("layout", [APRIEL_H1, MAMBAINLLAMA])
@pytest.mark.parametrize("make, message", [
    (lambda: hybridize(make_teacher("llama", **PLAIN), [1], identity_layers=[2]), r"identity layers \(layers \[2\]"),
    (lambda: hybridize(make_teacher("llama", **{**PLAIN, "head_dim": 32, "num_attention_heads": 2,
                                                  "num_key_value_heads": 1}), [1], gqa_expansion="head_aligned"),
     "head-aligned GQA expansion"),
    (lambda: hybridize(make_teacher("qwen2", head_dim=16), [1]), r"biases \(attention_bias, mamba_in_proj_bias\)"),
])
def test_export_refuses_what_the_layout_cannot_express(tmp_path, layout, make, message):
    with pytest.raises(LayoutError, match=message):
        write_layout(make(), tmp_path / "out", layout)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_import_refuses_unknown_apriel_layer_kinds(tmp_path):
    hybrid = plain_hybrid()
    write_layout(hybrid, tmp_path / "a", APRIEL_H1)
    body = json.loads((tmp_path / "a" / "config.json").read_text())
    body["hybrid_block_layout"][0] = "m2d"
    (tmp_path / "a" / "config.json").write_text(json.dumps(body))
    with pytest.raises(LayoutError, match=r"layer kinds \['m2d'\] have no counterpart"):
        load_pretrained(tmp_path / "a")


def test_import_names_a_missing_tensor(tmp_path):
    write_layout(plain_hybrid(), tmp_path / "m", MAMBAINLLAMA)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.mamba.D"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(LayoutError, match=r"tensors missing \['model.layers.1.mixer.D'\]"):
        load_pretrained(tmp_path / "m")


# --- the vLLM plugin's loader ---------------------------------------------------------------------

def qwerky_plugin_expects(config: LlamaConfig, mamba: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes qwerky-vllm-models 0.2.61 loads a Mamba-1 MambaInLlama checkpoint into,
    read off its source: attention layers are vLLM LlamaDecoderLayers fed from `mha.in_proj.weight`
    (rows q, k, v with head_dim = hidden / heads) and `mha.out_proj.weight`; Mamba layers take
    `mamba.in_proj.weight` split in five shards [d_inner, d_xb, d_xb, d_inner, dt_rank] with
    dt_rank = ceil(d_model / 16), `mamba.conv1d.weight` (conv_dim, 1, d_conv) with a bias, `mamba.dt_proj`
    with a bias, `mamba.A_log` (converted to A), `mamba.D`, `mamba.out_proj.weight` without bias; MLPs as
    gate/up/down; `lm_head.weight` (ParallelLMHead, never tied)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    # Its mixer reads d_state / d_conv from its config's ssm_cfg, which it fills from mamba_config.json's
    # "ssm_config" or else config.json's "ssm_cfg" (never mamba_config.json's "ssm_cfg"); default 16 / 4.
    ssm = mamba.get("ssm_config") or getattr(config, "ssm_cfg", None) or {}
    d_inner, d_xb, d_state = mamba["d_inner"], mamba["d_xb"], ssm.get("d_state", 16)
    d_conv, rank = ssm.get("d_conv", 4), math.ceil(mamba["d_model"] / 16)
    conv_dim = d_inner if ssm.get("repeat_kv_before_conv", True) else d_xb
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight": (hidden,),
                       prefix + "mlp.gate_proj.weight": (config.intermediate_size, hidden),
                       prefix + "mlp.up_proj.weight": (config.intermediate_size, hidden),
                       prefix + "mlp.down_proj.weight": (hidden, config.intermediate_size)})
        if layer in mamba["attn_layers"]:
            shapes.update({prefix + "mha.in_proj.weight": (q + 2 * kv, hidden), prefix + "mha.out_proj.weight": (hidden, q)})
        else:
            shapes.update({
                prefix + "mamba.in_proj.weight": (2 * d_inner + 2 * d_xb + rank, hidden),
                prefix + "mamba.conv1d.weight": (conv_dim, 1, d_conv), prefix + "mamba.conv1d.bias": (conv_dim,),
                prefix + "mamba.dt_proj.weight": (d_inner, rank), prefix + "mamba.dt_proj.bias": (d_inner,),
                prefix + "mamba.A_log": (d_inner, d_state), prefix + "mamba.D": (d_inner,),
                prefix + "mamba.out_proj.weight": (hidden, d_inner)})
    return shapes


@pytest.mark.parametrize(("d_state", "d_conv"), [(16, 4), (8, 3)], ids=["recipe", "other-d_state-d_conv"])
def test_mambainllama_export_matches_the_vllm_plugin_loader(tmp_path, d_state, d_conv):
    hybrid = hybridize(make_teacher("llama", tie_word_embeddings=True, **PLAIN), [0, 1, 3], dt_rank=4,
                       d_state=d_state, d_conv=d_conv)
    write_layout(hybrid, tmp_path / "mil", MAMBAINLLAMA)
    body = json.loads((tmp_path / "mil" / "config.json").read_text())
    mamba = json.loads((tmp_path / "mil" / "mamba_config.json").read_text())
    assert body["architectures"] == ["MambaInLlamaMambaForCausalLM"] and body["model_type"] == "llama"
    # MambaInLlama's own MambaConfig dataclass takes exactly these fields (mamba/hybrid_mamba_config.py).
    assert set(mamba) <= {"d_model", "ssm_cfg", "rms_norm_eps", "vocab_size", "d_inner", "d_xb",
                          "intermediate_size", "hidden_act", "n_layer", "attn_layers"}
    assert mamba["attn_layers"] == [2]
    tensors = load_file(tmp_path / "mil" / "model.safetensors")
    expected = qwerky_plugin_expects(LlamaConfig(**body), mamba)
    assert {key: tuple(value.shape) for key, value in tensors.items()} == expected
    assert mambainllama_plugin_notes(hybrid.config) == []


def test_mambainllama_export_notes_a_dt_rank_the_plugin_cannot_load():
    hybrid = hybridize(make_teacher("llama", **PLAIN), [1], dt_rank=16)
    (note,) = mambainllama_plugin_notes(hybrid.config)
    assert "dt_rank = ceil(hidden_size / 16) = 4" in note and "dt_rank 16" in note


# --- self-contained checkpoints and the command --------------------------------------------------

def test_self_contained_checkpoint_loads_without_this_package(tmp_path):
    hybrid = plain_hybrid(mamba_layers=(0, 2))
    folder = tmp_path / "portable"
    hybrid.save_pretrained(folder, self_contained=True)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "hybrid_modeling.HybridForCausalLM"
    torch.save({"tokens": TOKENS, "logits": logits(hybrid)}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["pipeline"] = None  # the package is not importable here (an editable install would be)
try:
    import pipeline.model
except ImportError:
    pass
else:
    raise SystemExit("pipeline is importable")
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    out = model(expected["tokens"]).logits
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert torch.equal(out, expected["logits"]), (out - expected["logits"]).abs().max()
generated = model.generate(expected["tokens"][:1], max_new_tokens=3, do_sample=False)
print("ok", type(model).__name__, tuple(generated.shape))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok HybridForCausalLM (1, 14)" in result.stdout


def test_export_command(tmp_path, capsys):
    from tests.teachers import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "teacher")
    assert export_main([str(teacher), str(tmp_path / "native"), "--format", "native"]) == 0
    files = {path.name for path in (tmp_path / "native").iterdir()}
    assert {"config.json", "model.safetensors", "hybrid_modeling.py", "tokenizer.json"} <= files
    assert export_main([str(tmp_path / "native"), str(tmp_path / "mil"), "--format", "mambainllama"]) == 0
    assert "note: the qwerky-vllm-models plugin fixes dt_rank" not in capsys.readouterr().out  # no Mamba layer
    assert (tmp_path / "mil" / "tokenizer.json").is_file()
    # A second export to an existing folder, and a format that cannot hold the model: one line, nothing written.
    assert export_main([str(tmp_path / "native"), str(tmp_path / "mil"), "--format", "apriel_h1"]) == 2
    assert "already exists" in capsys.readouterr().err
    qwen = hybridize(make_teacher("qwen2", head_dim=16), [1])
    qwen.save_pretrained(tmp_path / "qwen")
    assert export_main([str(tmp_path / "qwen"), str(tmp_path / "qwen-apriel"), "--format", "apriel_h1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export:")]
    assert len(errors) == 1 and "cannot express biases" in errors[0]
    assert not (tmp_path / "qwen-apriel").exists()
