"""Other projects' hybrid checkpoint layouts, in and out: Apriel-H1 and MambaInLlama.

Both layouts hold the same Mamba-1 mixer as ours (MIL layout: in_proj rows z, x, B, C; x and B repeated
in d_state chunks to d_inner before the conv; dt through a low-rank pair; A_log, D fp32) and the same
Llama/Mistral block around it, so a conversion is renames, concatenations and one rescale. The facts
below were read from the public modeling code of each project.

Apriel-H1 (`model_type: apriel_hybrid_ssm`, ServiceNow; a MistralConfig plus `hybrid_block_layout` and
`ssm_cfg`): layer kinds "t" (Mistral attention layer, `self_attn.{q,k,v,o}_proj`), "m2" (our Mamba:
`mixer.{in_proj, dt_in_proj, dt_proj, conv1d, A_log, D, out_proj}`, the same names and shapes as ours) and
"gdn" (Gated DeltaNet as Fast-LLM's `GatedDeltaNet` writes it: `mixer.in_proj_qkvz` rows [q | k | v | z]
of all heads each, `mixer.in_proj_ba` rows [beta | alpha], `mixer.convolution` (depthwise, no bias) over
[q | k | v], `mixer.{A_log, dt_bias, norm, out_proj}`; q and k have `gdn_num_key_heads` heads, v, z, the
gates and the state `gdn_num_value_heads`, in `linear_attn_config` with the head dims and
`gdn_linear_conv_kernel_size`). `ssm_cfg` holds d_inner, d_xb, d_state, d_conv, dt_rank ("auto" =
ceil(hidden / 16)), repeat_kv_before_conv (False: the conv runs on the d_xb channels before the repeat),
conv_bias, bias (in_proj / dt_in_proj / out_proj biases), dt_proj_bias. Other kinds ("m2d" discrete
Mamba-2, "i" a whole-block identity, "kl", ...) have no counterpart here. ServiceNow's own
`modeling_apriel_hybrid_ssm.py` builds no "gdn" block: Fast-LLM reads those checkpoints, transformers
with that file does not.

MambaInLlama (jxiw/MambaInLlama; served by the `qwerky-vllm-models` vLLM plugin): the teacher's
LlamaConfig in `config.json` plus `mamba_config.json` (d_model, d_inner, d_xb, ssm_cfg, attn_layers,
...); every layer not in attn_layers is Mamba. Mamba weights under `mamba.`, either split as trained
(`in_proj_z`, `in_proj_x`, `B_proj`, `C_proj`, `dt_proj_down`) or merged as served
(`in_proj` = rows [z, x, B, C, dt_down], the plugin's five shards); attention as trained
(`self_attn.{q,k,v,o}_proj`) or as served (`mha.in_proj` = rows [q, k, v], `mha.out_proj`).
We write the served form: it is what the plugin's loader and MambaInLlama's inference wrapper read.

One difference in the maths: both projects apply dt_proj's bias twice (`dt = dt_proj(dt_down(h))`
includes it, and the scan adds it again as delta_bias); ours adds it once. So their bias is half of
ours: import doubles it, export halves it (both exact in floating point).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from pipeline.model.checkpoint import layer_of
from pipeline.model.config import ATTENTION, GDN, MAMBA, HybridConfig
from pipeline.model.mixers import gqa_expansion_index

NATIVE = "native"
APRIEL_H1 = "apriel_h1"
MAMBAINLLAMA = "mambainllama"
LAYOUTS = (NATIVE, APRIEL_H1, MAMBAINLLAMA)
TRANSFORMERS = "transformers"  # a plain transformers checkpoint (a teacher): not a hybrid layout

APRIEL_MODEL_TYPE = "apriel_hybrid_ssm"
APRIEL_ARCHITECTURE = "AprielHybridSSMForCausalLM"
APRIEL_KINDS = {"t": ATTENTION, "m2": MAMBA, "gdn": GDN}
MIL_CONFIG = "mamba_config.json"
MIL_ARCHITECTURE = "MambaInLlamaMambaForCausalLM"  # the name the qwerky-vllm-models plugin registers
WEIGHTS = "model.safetensors"
# Files copied beside exported weights (tokenizer, generation settings).
SIDE_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|chat_template.*|generation_config\.json|"
                        r"vocab\..*|merges\.txt|added_tokens\.json)$")


class LayoutError(ValueError):
    """A checkpoint that cannot be read in, or a hybrid that cannot be written out, in a given layout."""


# --- reading folders ------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def detect_layout(folder: str | os.PathLike) -> str:
    """native, apriel_h1, mambainllama, or transformers (anything else with a config.json)."""
    folder = Path(folder)
    return detect_layout_of(read_json(folder / "config.json"), {} if (folder / MIL_CONFIG).is_file() else None)


def detect_layout_of(config: dict, mamba: dict | None) -> str:
    """detect_layout from a config.json body and the mamba_config.json body (None: the folder has none)."""
    if config.get("model_type") == HybridConfig.model_type:
        return NATIVE
    if config.get("model_type") == APRIEL_MODEL_TYPE:
        return APRIEL_H1
    if mamba is not None:
        return MAMBAINLLAMA
    return TRANSFORMERS


def layer_kinds(body: dict, mamba: dict | None = None) -> list[str]:
    """The kind of each layer (ATTENTION, MAMBA, GDN, IDENTITY) as a checkpoint's config files declare it, read
    without its weights: ours (`layer_types`), Apriel-H1 (`hybrid_block_layout`), MambaInLlama (`mamba`:
    its mamba_config.json, every layer not in `attn_layers` is Mamba), else all attention (a teacher)."""
    from pipeline.model.config import LAYER_KINDS

    layers = body.get("num_hidden_layers")
    if body.get("model_type") == HybridConfig.model_type:
        kinds = list(body.get("layer_types") or [])
        unknown = sorted({kind for kind in kinds if kind not in LAYER_KINDS})
        if unknown:
            raise LayoutError(f"layer types {unknown} are not known here (known: {', '.join(LAYER_KINDS)})")
        return kinds
    if body.get("model_type") == APRIEL_MODEL_TYPE:
        layout = body.get("hybrid_block_layout") or []
        unknown = sorted({kind for kind in layout if kind not in APRIEL_KINDS})
        if unknown or not layout:
            raise LayoutError(f"Apriel-H1 layer kinds {unknown or 'none'} have no counterpart here "
                              "(hybrid_block_layout of 't' attention, 'm2' Mamba and 'gdn' Gated DeltaNet)")
        return [APRIEL_KINDS[kind] for kind in layout]
    if mamba is not None:
        attention = set(mamba.get("attn_layers") or [])
        return [ATTENTION if index in attention else MAMBA for index in range(mamba.get("n_layer") or layers or 0)]
    return [ATTENTION] * int(layers or 0)


def read_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: model.safetensors, a sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            tensors.update(load_file(folder / shard))
        return tensors
    files = sorted(folder.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            tensors.update(load_file(file))
        return tensors
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise LayoutError(f"{folder}: no weights (model.safetensors, an index, or pytorch_model.bin)")


def _rope_parameters(config: dict) -> dict:
    """rope_parameters (transformers 5) from either naming (5's rope_parameters, 4's rope_theta/rope_scaling)."""
    if config.get("rope_parameters"):
        return dict(config["rope_parameters"])
    scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return {"rope_type": "default", **scaling, "rope_theta": float(config.get("rope_theta", 10000.0))}


def _legacy_rope(rope_parameters: dict | None) -> dict:
    """rope_theta / rope_scaling as transformers 4 configs (and both projects' code) spell them."""
    rope = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    theta = rope.pop("rope_theta", 10000.0)
    return {"rope_theta": theta} if rope.get("rope_type", "default") == "default" else \
        {"rope_theta": theta, "rope_scaling": rope}


def _decoder_fields(config: dict) -> dict:
    """The HybridConfig fields of the Llama/Mistral decoder, from a config.json of either project."""
    heads = config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        initializer_range=config.get("initializer_range", 0.02),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(config),
        attention_dropout=float(config.get("attention_dropout") or 0.0),
        sliding_window=config.get("sliding_window"),
    )


def _decoder_json(config: HybridConfig) -> dict:
    """A Llama/Mistral-style config.json body for our decoder (transformers 4 and 5 both read it)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=True,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_dropout=config.attention_dropout,
        rope_parameters=dict(config.rope_parameters),
        **_legacy_rope(config.rope_parameters),
    )


# --- what a layout cannot express ----------------------------------------------------------------

def _refuse_inexpressible(config: HybridConfig, layout: str) -> None:
    """One line naming the first thing of ours `layout` has no way to write."""
    if config.identity_layers:
        raise LayoutError(f"{layout} cannot express identity layers (layers {config.identity_layers}: a mixer-less "
                          "block that keeps its MLP)")
    chunk = gqa_expansion_index(config.mamba_d_inner, config.mamba_d_xb, config.mamba_d_state)
    aligned = gqa_expansion_index(config.mamba_d_inner, config.mamba_d_xb, config.head_dim)
    if config.mamba_gqa_expansion == "head_aligned" and config.mamba_layers and not torch.equal(chunk, aligned):
        raise LayoutError(f"{layout} cannot express the head-aligned GQA expansion (it repeats x and B in "
                          "d_state chunks only)")
    biases = [name for name in ("attention_bias", "attention_out_bias", "mlp_bias") if getattr(config, name)]
    if config.mamba_layers:
        biases += [name for name in ("mamba_in_proj_bias", "mamba_out_proj_bias") if getattr(config, name)]
    if config.gdn_layers:
        biases += [name for name in ("gdn_in_proj_bias", "gdn_out_proj_bias") if getattr(config, name)]
    if biases:
        raise LayoutError(f"{layout} cannot express biases ({', '.join(biases)})")
    if config.hidden_act != "silu":
        raise LayoutError(f"{layout} cannot express hidden_act={config.hidden_act!r} (its MLP is SiLU-gated)")


# --- Apriel-H1 -------------------------------------------------------------------------------------

APRIEL_CODES = {ATTENTION: "t", MAMBA: "m2", GDN: "gdn"}


def _gdn_expansion(config: HybridConfig) -> torch.Tensor:
    """Rows of our k (or v) projection, g heads of e, read by each of the h heads Apriel-H1 writes (head i
    reads KV head i // (h / g), as our mixer expands them)."""
    heads, kv_heads, dim = config.gdn_num_heads, config.gdn_num_kv_heads, config.gdn_head_dim
    head = torch.arange(heads) // (heads // kv_heads)
    return (head[:, None] * dim + torch.arange(dim)[None, :]).reshape(-1)


def _gdn_to_apriel(config: HybridConfig, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One Gated DeltaNet layer in Fast-LLM's names: k and v written for every head (q's head count)."""
    heads, dim = config.gdn_num_heads, config.gdn_head_dim
    q_width, kv_width = heads * dim, config.gdn_num_kv_heads * dim
    index = _gdn_expansion(config)
    q, k, v, z, beta, alpha = state[prefix + "in_proj.weight"].split(
        [q_width, kv_width, kv_width, q_width, heads, heads])
    conv = state[prefix + "conv1d.weight"]  # (q | k | v channels, 1, kernel)
    conv_q, conv_k, conv_v = conv.split([q_width, kv_width, kv_width])
    return {
        prefix + "in_proj_qkvz.weight": torch.cat([q, k.index_select(0, index), v.index_select(0, index), z]),
        prefix + "in_proj_ba.weight": torch.cat([beta, alpha]),
        prefix + "convolution.weight": torch.cat([conv_q, conv_k.index_select(0, index), conv_v.index_select(0, index)]),
        prefix + "A_log": state[prefix + "A_log"], prefix + "dt_bias": state[prefix + "dt_bias"],
        prefix + "norm.weight": state[prefix + "norm.weight"], prefix + "out_proj.weight": state[prefix + "out_proj.weight"],
    }


def to_apriel_h1(config: HybridConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of the hybrid in the Apriel-H1 layout."""
    _refuse_inexpressible(config, "the Apriel-H1 layout")
    layout = [APRIEL_CODES[kind] for kind in config.layer_types]
    tensors = {}
    for layer in config.gdn_layers:
        tensors.update({key: tensor.contiguous() for key, tensor in
                        _gdn_to_apriel(config, f"model.layers.{layer}.mixer.", state).items()})
    for key, tensor in state.items():
        layer = layer_of(key)
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if layer is not None and ".mixer." in key and config.layer_types[layer] == GDN:
            continue  # written above
        if layer is not None and ".mixer." in key and config.layer_types[layer] == ATTENTION:
            key = key.replace(".mixer.", ".self_attn.")
        elif key.endswith(".mixer.dt_proj.bias"):
            tensor = tensor / 2  # their dt bias is applied twice
        tensors[key] = tensor.contiguous()
    ssm_cfg = {
        "d_inner": config.mamba_d_inner, "d_xb": config.mamba_d_xb, "d_state": config.mamba_d_state,
        "d_conv": config.mamba_d_conv, "dt_rank": config.mamba_dt_rank, "expand": 1,
        "repeat_kv_before_conv": True, "conv_bias": config.mamba_conv_bias, "bias": False, "dt_proj_bias": True,
        "dt_min": config.mamba_dt_min, "dt_max": config.mamba_dt_max, "dt_init_floor": config.mamba_dt_init_floor,
        "dt_init": "random", "dt_scale": 1.0, "activation": "silu",
        "n_qk_heads": config.num_attention_heads, "n_v_heads": config.num_attention_heads,
    }
    body = {"architectures": [APRIEL_ARCHITECTURE], "model_type": APRIEL_MODEL_TYPE, **_decoder_json(config),
            "sliding_window": config.sliding_window, "hybrid_block_layout": layout, "ssm_cfg": ssm_cfg}
    if config.gdn_layers:  # Fast-LLM's keys (fast_llm/models/gpt/conversion/apriel.py GatedDeltaNetConverter)
        body["linear_attn_config"] = {
            "gdn_num_value_heads": config.gdn_num_heads, "gdn_num_key_heads": config.gdn_num_heads,
            "gdn_key_head_dim": config.gdn_head_dim, "gdn_value_head_dim": config.gdn_head_dim,
            "gdn_linear_conv_kernel_size": config.gdn_conv_kernel,
        }
    return body, tensors


def _gdn_from_apriel(body: dict, layers: list[int], tensors: dict[str, torch.Tensor], kv_heads: int) -> dict:
    """HybridConfig's Gated DeltaNet fields from Apriel-H1's `linear_attn_config`, with k and v read back at
    `kv_heads` heads where every group of heads holds the same k and v rows (as our export writes them), else
    at one a head. A q shared by several value heads has no counterpart here."""
    gdn = dict(body.get("linear_attn_config") or {})
    missing = [key for key in ("gdn_num_value_heads", "gdn_num_key_heads", "gdn_key_head_dim", "gdn_value_head_dim",
                               "gdn_linear_conv_kernel_size") if key not in gdn]
    if missing:
        raise LayoutError(f"Apriel-H1 'gdn' layers need linear_attn_config keys {missing}")
    heads, key_heads = gdn["gdn_num_value_heads"], gdn["gdn_num_key_heads"]
    if key_heads != heads:
        raise LayoutError(f"Apriel-H1 'gdn' layers with {key_heads} query/key heads for {heads} value heads have no "
                          "counterpart here (our q has one head a value head; only k and v are shared)")
    if gdn["gdn_key_head_dim"] != gdn["gdn_value_head_dim"]:
        raise LayoutError(f"Apriel-H1 'gdn' layers with key head dim {gdn['gdn_key_head_dim']} != value head dim "
                          f"{gdn['gdn_value_head_dim']} have no counterpart here")
    dim = gdn["gdn_key_head_dim"]
    fields = {"gdn_num_heads": heads, "gdn_head_dim": dim, "gdn_conv_kernel": gdn["gdn_linear_conv_kernel_size"],
              "gdn_num_kv_heads": heads}
    if kv_heads and heads % kv_heads == 0 and kv_heads < heads:
        shared = True
        for layer in layers:
            prefix = f"model.layers.{layer}.mixer."
            qkvz = tensors.get(prefix + "in_proj_qkvz.weight")
            conv = tensors.get(prefix + "convolution.weight")
            if qkvz is None or conv is None:
                break
            width = heads * dim
            for rows in (qkvz[width: 3 * width], conv[width: 3 * width]):
                grouped = rows.reshape(2, kv_heads, heads // kv_heads, dim, *rows.shape[1:])
                shared = shared and bool((grouped == grouped[:, :, :1]).all())
        if shared:
            fields["gdn_num_kv_heads"] = kv_heads
    return fields


def _gdn_state_from_apriel(config: HybridConfig, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """One Apriel-H1 'gdn' layer's tensors -> ours (k and v rows of every head -> those of the KV heads)."""
    heads, dim = config.gdn_num_heads, config.gdn_head_dim
    width, repeat = heads * dim, heads // config.gdn_num_kv_heads
    keep = (torch.arange(config.gdn_num_kv_heads)[:, None] * repeat * dim + torch.arange(dim)[None, :]).reshape(-1)

    def shared(rows):
        return rows.index_select(0, keep)

    try:
        q, k, v, z = tensors[prefix + "in_proj_qkvz.weight"].split([width] * 4)
        conv_q, conv_k, conv_v = tensors[prefix + "convolution.weight"].split([width] * 3)
        beta_alpha = tensors[prefix + "in_proj_ba.weight"]
        return {
            prefix + "in_proj.weight": torch.cat([q, shared(k), shared(v), z, beta_alpha]),
            prefix + "conv1d.weight": torch.cat([conv_q, shared(conv_k), shared(conv_v)]),
            **{prefix + name: tensors[prefix + name] for name in ("A_log", "dt_bias", "norm.weight", "out_proj.weight")},
        }
    except (KeyError, RuntimeError) as error:
        raise LayoutError(f"Apriel-H1 'gdn' layer {prefix}: {type(error).__name__}: {error}") from None


def from_apriel_h1(body: dict, tensors: dict[str, torch.Tensor]) -> tuple[HybridConfig, dict[str, torch.Tensor]]:
    layout = body.get("hybrid_block_layout")
    if not layout:
        raise LayoutError("Apriel-H1 config.json has no hybrid_block_layout")
    unknown = sorted({kind for kind in layout if kind not in APRIEL_KINDS})
    if unknown:
        raise LayoutError(f"Apriel-H1 layer kinds {unknown} have no counterpart here (supported: 't' attention, "
                          "'m2' Mamba)")
    ssm = dict(body.get("ssm_cfg") or {})
    if ssm.get("bias"):
        raise LayoutError("Apriel-H1 ssm_cfg.bias=true (biases on in_proj, dt_in_proj, out_proj) is not supported")
    if not ssm.get("dt_proj_bias", True):
        raise LayoutError("Apriel-H1 ssm_cfg.dt_proj_bias=false is not supported (our dt projection has a bias)")
    hidden = body["hidden_size"]
    dt_rank = ssm.get("dt_rank", "auto")
    fields = _decoder_fields(body)
    gdn_layers = [index for index, kind in enumerate(layout) if APRIEL_KINDS[kind] == GDN]
    gdn = _gdn_from_apriel(body, gdn_layers, tensors, fields["num_key_value_heads"]) if gdn_layers else {}
    config = HybridConfig(
        **fields,
        **gdn,
        layer_types=[APRIEL_KINDS[kind] for kind in layout],
        mamba_d_state=ssm.get("d_state", 16),
        mamba_d_conv=ssm.get("d_conv", 4),
        mamba_dt_rank=math.ceil(hidden / 16) if dt_rank == "auto" else int(dt_rank),
        mamba_d_inner=ssm.get("d_inner") or fields["num_attention_heads"] * fields["head_dim"],
        mamba_d_xb=ssm.get("d_xb") or hidden,
        mamba_gqa_expansion="chunk",
        mamba_conv_bias=bool(ssm.get("conv_bias", True)),
        mamba_dt_min=ssm.get("dt_min", 0.001),
        mamba_dt_max=ssm.get("dt_max", 0.1),
        mamba_dt_init_floor=ssm.get("dt_init_floor", 1e-4),
    )
    state = {}
    for layer in gdn_layers:
        state.update(_gdn_state_from_apriel(config, f"model.layers.{layer}.mixer.", tensors))
    for key, tensor in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older checkpoints saved
        if layer_of(key) in gdn_layers and ".mixer." in key:
            continue  # read above
        key = key.replace(".self_attn.", ".mixer.")
        if key.endswith(".mixer.dt_proj.bias"):
            tensor = tensor * 2
        state[key] = tensor
    if ssm.get("repeat_kv_before_conv", True) is False:
        _expand_conv(config, state)
    return config, state


def _expand_conv(config: HybridConfig, state: dict[str, torch.Tensor]) -> None:
    """A depthwise conv over the d_xb channels, then the repeat = the repeat, then a conv whose channel j
    has the weights of source channel index[j]: ours runs the conv after the repeat."""
    index = gqa_expansion_index(config.mamba_d_inner, config.mamba_d_xb, config.mamba_d_state)
    for layer in config.mamba_layers:
        for name in ("weight", "bias"):
            key = f"model.layers.{layer}.mixer.conv1d.{name}"
            if key in state and state[key].shape[0] == config.mamba_d_xb:
                state[key] = state[key].index_select(0, index)


# --- MambaInLlama -----------------------------------------------------------------------------------

def to_mambainllama(config: HybridConfig, state: dict[str, torch.Tensor]
                    ) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(config.json, mamba_config.json, tensors) in MambaInLlama's served layout."""
    if config.gdn_layers:
        raise LayoutError(f"the MambaInLlama layout cannot express Gated DeltaNet layers (layers {config.gdn_layers}: "
                          "it knows attention and Mamba-1 only); export them with --format apriel_h1 or native")
    _refuse_inexpressible(config, "the MambaInLlama layout")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise LayoutError(f"the MambaInLlama layout cannot express head_dim={config.head_dim} with hidden_size="
                          f"{config.hidden_size} and {config.num_attention_heads} heads (it derives head_dim = "
                          "hidden_size / heads)")
    if config.sliding_window is not None:
        raise LayoutError(f"the MambaInLlama layout cannot express sliding_window={config.sliding_window} "
                          "(Llama attention)")
    d_inner, d_xb = config.mamba_d_inner, config.mamba_d_xb
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        layer = layer_of(key)
        if layer is None or ".mixer." not in key:
            tensors[key] = tensor.contiguous()
            continue
        prefix = f"model.layers.{layer}."
        name = key[len(prefix) + len("mixer."):]
        if config.layer_types[layer] == ATTENTION:
            if name == "o_proj.weight":
                tensors[prefix + "mha.out_proj.weight"] = tensor.contiguous()
            elif name == "q_proj.weight":  # rows [q, k, v]
                tensors[prefix + "mha.in_proj.weight"] = torch.cat(
                    [tensor, state[prefix + "mixer.k_proj.weight"], state[prefix + "mixer.v_proj.weight"]])
            continue
        if name == "in_proj.weight":  # rows [z, x, B, C] + dt_down
            tensors[prefix + "mamba.in_proj.weight"] = torch.cat([tensor, state[prefix + "mixer.dt_in_proj.weight"]])
        elif name == "dt_proj.bias":
            tensors[prefix + "mamba.dt_proj.bias"] = tensor / 2  # their dt bias is applied twice
        elif name != "dt_in_proj.weight":
            tensors[prefix + "mamba." + name] = tensor.contiguous()
    for layer in config.mamba_layers:
        key = f"model.layers.{layer}.mamba.conv1d.bias"
        if key not in tensors:  # the plugin's conv always has a bias: a zero one is the same conv
            weight = tensors[f"model.layers.{layer}.mamba.conv1d.weight"]
            tensors[key] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if "lm_head.weight" not in tensors or config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # the plugin never ties
    ssm_cfg = {"d_state": config.mamba_d_state, "d_conv": config.mamba_d_conv, "dt_rank": config.mamba_dt_rank,
               "expand": 1, "repeat_kv_before_conv": True, "conv_bias": True}
    # ssm_cfg in config.json too: the qwerky-vllm-models plugin reads d_state and d_conv from there (or from
    # a mamba_config.json key "ssm_config" that MambaInLlama's own loader would refuse), never from
    # mamba_config.json's ssm_cfg, and takes 16 and 4 otherwise
    body = {"architectures": [MIL_ARCHITECTURE], "model_type": "llama", **_decoder_json(config),
            "attention_bias": False, "mlp_bias": False, "ssm_cfg": dict(ssm_cfg)}
    mamba = {
        "d_model": config.hidden_size,
        "ssm_cfg": ssm_cfg,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "d_inner": d_inner,
        "d_xb": d_xb,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "n_layer": config.num_hidden_layers,
        "attn_layers": config.attention_layers,
    }
    return body, mamba, tensors


_MIL_SPLIT = ("in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down")  # rows of the merged in_proj


def from_mambainllama(body: dict, mamba: dict, tensors: dict[str, torch.Tensor]
                      ) -> tuple[HybridConfig, dict[str, torch.Tensor]]:
    fields = _decoder_fields(body)
    layers = fields["num_hidden_layers"]
    if mamba.get("n_layer", layers) != layers:
        raise LayoutError(f"mamba_config.json n_layer={mamba['n_layer']} but config.json has {layers} layers")
    if body.get("attention_bias") or body.get("mlp_bias"):
        raise LayoutError("MambaInLlama checkpoints with attention or MLP biases are not supported")
    attention = set(mamba.get("attn_layers") or [])
    ssm = dict(mamba.get("ssm_cfg") or {})
    for flag in ("proj_x_bias", "proj_z_bias", "out_proj_bias"):
        if ssm.get(flag):
            raise LayoutError(f"MambaInLlama ssm_cfg.{flag}=true is not supported")
    hidden = mamba.get("d_model") or fields["hidden_size"]
    dt_rank = ssm.get("dt_rank", "auto")
    config = HybridConfig(
        **fields,
        layer_types=[ATTENTION if i in attention else MAMBA for i in range(layers)],
        mamba_d_state=ssm.get("d_state", 16),
        mamba_d_conv=ssm.get("d_conv", 4),
        mamba_dt_rank=math.ceil(hidden / 16) if dt_rank == "auto" else int(dt_rank),
        mamba_d_inner=mamba.get("d_inner") or fields["num_attention_heads"] * fields["head_dim"],
        mamba_d_xb=mamba.get("d_xb") or fields["num_key_value_heads"] * fields["head_dim"],
        mamba_gqa_expansion="chunk",
        mamba_conv_bias=bool(ssm.get("conv_bias", True)),
    )
    d_inner, d_xb, q_width = config.mamba_d_inner, config.mamba_d_xb, config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        layer = layer_of(key)
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if layer is None:
            state[key] = tensor
            continue
        prefix = f"model.layers.{layer}."
        name = key[len(prefix):]
        if name.startswith("self_attn."):
            state[prefix + "mixer." + name[len("self_attn."):]] = tensor
        elif name == "mha.in_proj.weight":
            q, k, v = tensor.split([q_width, kv_width, kv_width])
            for part, value in zip("qkv", (q, k, v)):
                state[prefix + f"mixer.{part}_proj.weight"] = value
        elif name == "mha.out_proj.weight":
            state[prefix + "mixer.o_proj.weight"] = tensor
        elif name == "mamba.in_proj.weight":
            zxbc, dt_down = tensor.split([2 * d_inner + 2 * d_xb, config.mamba_dt_rank])
            state[prefix + "mixer.in_proj.weight"] = zxbc
            state[prefix + "mixer.dt_in_proj.weight"] = dt_down
        elif name.startswith("mamba.") and name.split(".")[1] in _MIL_SPLIT:
            if not name.endswith(".weight"):
                raise LayoutError(f"MambaInLlama tensor {key}: biases on Mamba input projections are not supported")
            continue  # merged below, in [z, x, B, C] order
        elif name == "mamba.dt_proj.bias":
            state[prefix + "mixer.dt_proj.bias"] = tensor * 2  # their dt bias is applied twice
        elif name.startswith("mamba."):
            state[prefix + "mixer." + name[len("mamba."):]] = tensor
        else:
            state[key] = tensor
    for layer in config.mamba_layers:
        prefix = f"model.layers.{layer}.mamba."
        if prefix + "in_proj_z.weight" in tensors:
            missing = [part for part in _MIL_SPLIT if prefix + part + ".weight" not in tensors]
            if missing:
                raise LayoutError(f"MambaInLlama layer {layer}: split projections {missing} missing")
            rows = [tensors[prefix + part + ".weight"] for part in _MIL_SPLIT]
            state[f"model.layers.{layer}.mixer.in_proj.weight"] = torch.cat(rows[:4])
            state[f"model.layers.{layer}.mixer.dt_in_proj.weight"] = rows[4]
    if ssm.get("repeat_kv_before_conv", True) is False:
        _expand_conv(config, state)
    return config, state


# --- building and writing -----------------------------------------------------------------------

def expected_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HybridForCausalLM of `config` holds in its state dict, with its shape (no memory used)."""
    from pipeline.model.modeling import HybridForCausalLM

    with torch.device("meta"):
        model = HybridForCausalLM(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_state(config: HybridConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Key sets and shapes match exactly, or one line naming the difference."""
    expected = expected_shapes(config)
    state_keys = set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing = sorted(set(expected) - state_keys)
    extra = sorted(state_keys - set(expected))
    if missing or extra:
        raise LayoutError(f"{source}: tensors missing {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                          f"not understood {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise LayoutError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape}")


def build_hybrid(config: HybridConfig, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None):
    """A HybridForCausalLM holding exactly `state` (checked first), in `dtype` (default: the weights' own)."""
    from pipeline.model.modeling import HybridForCausalLM

    check_state(config, state, source)
    if dtype is None:
        dtype = state["model.embed_tokens.weight"].dtype
    model = HybridForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                              trust_remote_code=False)
    return model.eval()


def import_checkpoint(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """An Apriel-H1 or MambaInLlama checkpoint folder as a HybridForCausalLM."""
    folder = Path(folder)
    layout = detect_layout(folder)
    body = read_json(folder / "config.json")
    if layout == APRIEL_H1:
        config, state = from_apriel_h1(body, read_tensors(folder))
    elif layout == MAMBAINLLAMA:
        config, state = from_mambainllama(body, read_json(folder / MIL_CONFIG), read_tensors(folder))
    else:
        raise LayoutError(f"{folder} is neither an Apriel-H1 nor a MambaInLlama checkpoint (layout: {layout})")
    return build_hybrid(config, state, f"{layout} checkpoint {folder}", dtype)


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """Any checkpoint this project reads: ours, a transformers teacher, Apriel-H1 or MambaInLlama."""
    import pipeline.model  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    if detect_layout(folder) in (APRIEL_H1, MAMBAINLLAMA):
        return import_checkpoint(folder, dtype)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)


def native_state(model) -> dict[str, torch.Tensor]:
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def mambainllama_plugin_notes(config: HybridConfig) -> list[str]:
    """What keeps the qwerky-vllm-models plugin from serving a MambaInLlama export it can otherwise read."""
    notes = []
    plugin_rank = math.ceil(config.hidden_size / 16)
    if config.mamba_layers and config.mamba_dt_rank != plugin_rank:
        notes.append(f"the qwerky-vllm-models plugin fixes dt_rank = ceil(hidden_size / 16) = {plugin_rank}; this "
                     f"hybrid has dt_rank {config.mamba_dt_rank}, so the plugin cannot load it")
    return notes


def write_layout(model, out_dir: str | os.PathLike, layout: str, *, side_files_from: str | os.PathLike | None = None,
                 ) -> list[str]:
    """Write `model` (a HybridForCausalLM) in `layout` into `out_dir`, atomically; returns notes for the user.

    The folder appears complete or not at all: it is written beside and renamed into place.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from pipeline.model.modeling import HybridForCausalLM

    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if not isinstance(model, HybridForCausalLM):
        raise LayoutError(f"only a hybrid can be exported, got {type(model).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise LayoutError(f"{out_dir} already exists; choose a new folder")
    config, state, notes = model.config, native_state(model), []
    if layout == APRIEL_H1:
        body, tensors = to_apriel_h1(config, state)  # refusals happen here, before anything is written
    elif layout == MAMBAINLLAMA:
        body, mamba, tensors = to_mambainllama(config, state)
        notes = mambainllama_plugin_notes(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if layout == NATIVE:
            model.save_pretrained(staging, self_contained=True)
        else:
            dtype = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
            body["torch_dtype"] = body["dtype"] = dtype
            (staging / "config.json").write_text(json.dumps(body, indent=2) + "\n")
            if layout == MAMBAINLLAMA:
                (staging / MIL_CONFIG).write_text(json.dumps(mamba, indent=2) + "\n")
            save_file(tensors, staging / WEIGHTS, metadata={"format": "pt"})
        if side_files_from is not None:
            for path in sorted(Path(side_files_from).iterdir()):
                if path.is_file() and SIDE_FILES.match(path.name) and not (staging / path.name).exists():
                    shutil.copy2(path, staging / path.name)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return notes


__all__ = [
    "APRIEL_H1",
    "LAYOUTS",
    "LayoutError",
    "MAMBAINLLAMA",
    "NATIVE",
    "TRANSFORMERS",
    "build_hybrid",
    "check_state",
    "detect_layout",
    "detect_layout_of",
    "expected_shapes",
    "from_apriel_h1",
    "from_mambainllama",
    "import_checkpoint",
    "layer_kinds",
    "load_pretrained",
    "mambainllama_plugin_notes",
    "native_state",
    "read_tensors",
    "to_apriel_h1",
    "to_mambainllama",
    "write_layout",
]
