"""Teacher -> hybrid surgery with Mamba-in-Llama (MIL) initialisation, and its Gated DeltaNet counterpart.

`hybridize(teacher, mamba_layers)` returns a `HybridForCausalLM` whose listed layers hold Mamba-1
mixers initialised from that layer's attention (x <- v_proj, B <- k_proj, C <- q_proj,
out_proj <- o_proj, biases too) and whose every other weight is the teacher's, copied unchanged.
`gdn_layers=[...]` does the same with Gated DeltaNet mixers (`gdn_from_attention`: q, k, v, o copied,
the output gate zeroed). The source may be a Llama, Mistral or Qwen2 teacher, or a hybrid (progressive
steps convert more layers of the previous checkpoint). Every key is accounted for: copied, MIL-mapped,
freshly initialised (z, dt, conv, A_log, D), or dropped (the replaced attention), and shapes must match.

Randomness: a converted Mamba mixer's fresh parameters are drawn on the CPU from a generator of its own,
seeded from (seed, layer, draw) (`mixer_generator`), and only then copied to the model's device. So the
same seed gives bit-identical initial weights on every device, whatever else drew random numbers before,
and `hybridize(model, [layer], seed=s)` and `mamba_trial(model, layer, seed=s)` start layer `layer` from
the same mixer. A Gated DeltaNet mixer from attention draws nothing: `gdn_from_attention` sets every one
of its parameters, so it is the same for every seed and device (and `gdn_trial` builds it without values).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
import transformers
from transformers import PreTrainedModel

from pipeline.model.checkpoint import SUPPORTED_ARCHITECTURES, TEACHER_ARCHITECTURES, has_experts, layer_of
from pipeline.model.config import ATTENTION, GDN, IDENTITY, KIND_NAMES, MAMBA, HybridConfig
from pipeline.model.mixers import MambaMixer, build_mixer
from pipeline.model.modeling import HybridForCausalLM

TEACHER_CLASSES: tuple[type[PreTrainedModel], ...] = tuple(getattr(transformers, name)
                                                           for name in TEACHER_ARCHITECTURES)
SUPPORTED = ", ".join(SUPPORTED_ARCHITECTURES)

# Mamba options a caller may set; None = the recipe's default (or, for a hybrid source, its own value).
MAMBA_OPTIONS = {
    "d_state": "mamba_d_state",
    "dt_rank": "mamba_dt_rank",
    "d_conv": "mamba_d_conv",
    "d_inner": "mamba_d_inner",
    "gqa_expansion": "mamba_gqa_expansion",
    "conv_bias": "mamba_conv_bias",
    "dt_min": "mamba_dt_min",
    "dt_max": "mamba_dt_max",
}


# Gated DeltaNet options a caller may set (its head shape is the teacher's attention's, for the copy).
GDN_OPTIONS = {"conv_kernel": "gdn_conv_kernel"}
GDN_INITIAL_DECAY_RATE = 0.1  # A = exp(A_log) of a converted layer: decay exp(-A softplus(0)) = 0.933 a token
GDN_CONV_TAP = 0.5  # a converted layer's conv: 0.5 x the current input (identity, in silu's near-linear range)


class ConversionError(ValueError):
    """The teacher or the requested layers cannot be converted."""


def check_teacher(model: nn.Module) -> None:
    """One clear error for a model this project cannot convert."""
    if isinstance(model, HybridForCausalLM):
        return
    if not isinstance(model, TEACHER_CLASSES):
        raise ConversionError(f"unsupported teacher architecture {type(model).__name__}; supported: {SUPPORTED}")
    config = model.config
    if has_experts(config):
        raise ConversionError(
            f"unsupported teacher: {type(model).__name__} with mixture-of-experts layers; supported: {SUPPORTED}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({kind for kind in layer_types if kind != "full_attention"})
    if other:
        raise ConversionError(
            f"unsupported teacher layer types {other}: only full attention (optionally Mistral's sliding_window) "
            "can be converted"
        )


def hybrid_config_from_teacher(teacher_config, layer_types: list[str], **mamba_options) -> HybridConfig:
    """A HybridConfig that reproduces the teacher's decoder, with the given per-layer mixers."""
    source = teacher_config
    return HybridConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=source.initializer_range,
        rms_norm_eps=source.rms_norm_eps,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        tie_word_embeddings=source.tie_word_embeddings,
        rope_parameters=dict(source.rope_parameters) if source.rope_parameters is not None else None,
        attention_dropout=float(getattr(source, "attention_dropout", 0.0) or 0.0),
        mlp_bias=bool(getattr(source, "mlp_bias", False)),
        sliding_window=getattr(source, "sliding_window", None),
        layer_types=layer_types,
        **mamba_options,
    )


def _layer_list(name: str, layers: Iterable[int], num_layers: int) -> list[int]:
    layers = [int(i) for i in layers]
    for index in layers:
        if not 0 <= index < num_layers:
            raise ConversionError(f"{name}: layer index {index} is out of range for a {num_layers}-layer model")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ConversionError(f"{name}: layer indices repeated: {repeated}")
    return sorted(layers)


def _attention_biases(teacher: nn.Module) -> tuple[bool, bool]:
    """(q/k/v have biases, o_proj has a bias), read off the first attention layer's modules."""
    for layer in teacher.model.layers:
        attention = getattr(layer, "self_attn", None) or getattr(layer, "mixer", None)
        if attention is not None and hasattr(attention, "q_proj"):
            return attention.q_proj.bias is not None, attention.o_proj.bias is not None
    return False, False


def _source_key(key: str, is_hybrid: bool) -> str:
    """Hybrid key -> the teacher's key for the same tensor (the only rename: mixer. <-> self_attn.)."""
    return key if is_hybrid else key.replace(".mixer.", ".self_attn.")


def conversion_config(
    teacher: nn.Module,
    mamba_layers: Iterable[int],
    identity_layers: Iterable[int] = (),
    gdn_layers: Iterable[int] = (),
    gdn_options: dict | None = None,
    **mamba_options,
) -> tuple[HybridConfig, list[int], list[int], bool]:
    """The checks and the config of `hybridize(teacher, mamba_layers, ...)`, without building the hybrid:
    (the hybrid's config, the sorted new Mamba layers, the sorted new Gated DeltaNet layers, whether the
    source is a hybrid). Reads only the teacher's config, class and module structure, so a teacher on the
    meta device will do (`pipeline.convert.sharded`)."""
    check_teacher(teacher)
    unknown = sorted(set(mamba_options) - set(MAMBA_OPTIONS))
    if unknown:
        raise ConversionError(f"unknown Mamba option(s) {unknown}; valid: {sorted(MAMBA_OPTIONS)}")
    unknown = sorted(set(gdn_options or {}) - set(GDN_OPTIONS))
    if unknown:
        raise ConversionError(f"unknown Gated DeltaNet option(s) {unknown}; valid: {sorted(GDN_OPTIONS)}")
    source_config = teacher.config
    num_layers = source_config.num_hidden_layers
    new_mamba = _layer_list("mamba_layers", mamba_layers, num_layers)
    new_identity = _layer_list("identity_layers", identity_layers, num_layers)
    new_gdn = _layer_list("gdn_layers", gdn_layers, num_layers)
    for (name_a, list_a), (name_b, list_b) in (((MAMBA, new_mamba), (IDENTITY, new_identity)),
                                               ((MAMBA, new_mamba), (GDN, new_gdn)),
                                               ((GDN, new_gdn), (IDENTITY, new_identity))):
        both = sorted(set(list_a) & set(list_b))
        if both:
            raise ConversionError(f"layers {both} are listed both as {_kind_name(name_a)} and as {_kind_name(name_b)}")
    is_hybrid = isinstance(teacher, HybridForCausalLM)

    options = {MAMBA_OPTIONS[k]: v for k, v in mamba_options.items() if v is not None}
    gdn_settings = {GDN_OPTIONS[k]: v for k, v in (gdn_options or {}).items() if v is not None}
    if is_hybrid:
        layer_types = list(source_config.layer_types)
        for index in new_mamba + new_identity + new_gdn:
            if layer_types[index] != ATTENTION:
                raise ConversionError(f"layer {index} is already {_kind_name(layer_types[index])}; only attention "
                                      "layers can be converted")
        clashing = {k: v for k, v in options.items() if getattr(source_config, k) != v}
        if clashing:
            raise ConversionError(
                f"Mamba options {clashing} differ from the source hybrid's; a hybrid keeps its Mamba shape"
            )
        config = copy.deepcopy(source_config)
        if new_gdn:
            _set_gdn_settings(config, gdn_settings, config.attention_bias, config.attention_out_bias)
    else:
        layer_types = [ATTENTION] * num_layers
        qkv_bias, out_bias = _attention_biases(teacher)
        options.update(
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mamba_in_proj_bias=qkv_bias,
            mamba_out_proj_bias=out_bias,
        )
        config = hybrid_config_from_teacher(source_config, layer_types, **options)
        if new_gdn:
            _set_gdn_settings(config, gdn_settings, qkv_bias, out_bias)
    for index in new_mamba:
        layer_types[index] = MAMBA
    for index in new_identity:
        layer_types[index] = IDENTITY
    for index in new_gdn:
        layer_types[index] = GDN
    config.layer_types = layer_types
    config.validate_layer_type()
    if new_gdn:
        check_gdn_shape(config)

    d_inner, d_xb = config.mamba_d_inner, config.mamba_d_xb
    if new_mamba and (
        d_inner != config.num_attention_heads * config.head_dim
        or d_xb != config.num_key_value_heads * config.head_dim
    ):
        raise ConversionError(
            f"MIL initialisation needs d_inner = n_heads x head_dim ({config.num_attention_heads * config.head_dim}) "
            f"and d_xb = n_kv_heads x head_dim ({config.num_key_value_heads * config.head_dim}); "
            f"got d_inner={d_inner}, d_xb={d_xb}"
        )
    return config, new_mamba, new_gdn, is_hybrid


def hybridize(
    teacher: nn.Module,
    mamba_layers: Iterable[int],
    *,
    identity_layers: Iterable[int] = (),
    gdn_layers: Iterable[int] = (),
    gdn_options: dict | None = None,
    seed: int = 0,
    **mamba_options,
) -> HybridForCausalLM:
    """Convert `mamba_layers` of `teacher` to MIL-initialised Mamba mixers, `gdn_layers` to Gated DeltaNet
    mixers initialised from their attention (`gdn_from_attention`), and `identity_layers` to no mixer.

    mamba_options: d_state (16), dt_rank (16), d_conv (4), d_inner (n_heads x head_dim),
    gqa_expansion ("chunk" = Apriel/M1 layout, or "head_aligned"), conv_bias, dt_min, dt_max.
    gdn_options: conv_kernel (4). For a hybrid source the listed layers are converted in addition to its
    existing recurrent layers, and its Mamba options (and, once it has Gated DeltaNet layers, its Gated
    DeltaNet options) are kept. `seed`: each new Mamba mixer's random parameters come from
    `mixer_generator(seed, layer)` (on the CPU), so they are the same on every device; new Gated DeltaNet
    mixers draw nothing.
    """
    config, new_mamba, new_gdn, is_hybrid = conversion_config(teacher, mamba_layers, identity_layers, gdn_layers,
                                                              gdn_options, **mamba_options)

    parameter = next(teacher.parameters())
    # Every value the constructor draws is overwritten below (copied, MIL-mapped or drawn from each new
    # mixer's own generator); the fork keeps it from using up the caller's random streams.
    with _forked_rng(parameter.device), torch.device(parameter.device):
        hybrid = HybridForCausalLM(config)
    hybrid.to(parameter.dtype)
    _copy_weights(teacher, hybrid, new_mamba, is_hybrid, new_gdn, seed)
    hybrid.generation_config = teacher.generation_config
    return hybrid.eval() if not teacher.training else hybrid


def _kind_name(kind: str) -> str:
    return {MAMBA: "Mamba", GDN: "Gated DeltaNet", IDENTITY: "identity"}.get(kind, KIND_NAMES.get(kind, kind))


def _set_gdn_settings(config: HybridConfig, settings: dict, qkv_bias: bool, out_bias: bool) -> None:
    """Gated DeltaNet settings of a config that is about to get Gated DeltaNet layers: those of its existing
    ones if it has any (a different request is refused), else the requested ones and the teacher's biases."""
    if config.gdn_layers:
        clashing = {k: v for k, v in settings.items() if getattr(config, k) != v}
        if clashing:
            raise ConversionError(f"Gated DeltaNet options {clashing} differ from the source hybrid's; a hybrid keeps "
                                  "its Gated DeltaNet shape")
        return
    for name, value in settings.items():
        setattr(config, name, value)
    config.gdn_in_proj_bias, config.gdn_out_proj_bias = bool(qkv_bias), bool(out_bias)
    config.validate_architecture()


def check_gdn_shape(config: HybridConfig) -> None:
    """Initialising a Gated DeltaNet mixer from attention copies q/k/v/o_proj: its heads must be the teacher's."""
    wanted = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    got = (config.gdn_num_heads, config.gdn_num_kv_heads, config.gdn_head_dim)
    if got != wanted:
        raise ConversionError(
            f"initialising Gated DeltaNet from attention needs gdn_num_heads, gdn_num_kv_heads, gdn_head_dim = the "
            f"teacher's heads, KV heads and head_dim {wanted}; got {got}")


@torch.no_grad()
def _copy_weights(teacher: nn.Module, hybrid: HybridForCausalLM, new_mamba: list[int], is_hybrid: bool,
                  new_gdn: list[int], seed: int) -> None:
    source = teacher.state_dict()
    target = hybrid.state_dict()
    used: set[str] = set()
    fresh: list[str] = []
    new_mixers = set(new_mamba) | set(new_gdn)
    for key, tensor in target.items():
        layer = layer_of(key)
        if layer in new_mixers and ".mixer." in key:
            fresh.append(key)  # MIL-mapped below, or fresh initialisation
            continue
        source_key = _source_key(key, is_hybrid)
        if source_key not in source:
            raise ConversionError(f"weight surgery: {key} has no source tensor {source_key} in the teacher")
        if source[source_key].shape != tensor.shape:
            raise ConversionError(
                f"weight surgery: shape of {key} {tuple(tensor.shape)} != teacher's {tuple(source[source_key].shape)}"
            )
        tensor.copy_(source[source_key])
        used.add(source_key)

    for index in new_mamba:
        mixer = hybrid.model.layers[index].mixer
        initialise_fresh(mixer, mixer_generator(seed, index), hybrid.config)
        _mil_initialise(mixer, _attention_of(teacher, index))
        prefix = f"model.layers.{index}.{'mixer' if is_hybrid else 'self_attn'}."
        used.update(key for key in source if key.startswith(prefix))
    for index in new_gdn:
        gdn_from_attention(hybrid.model.layers[index].mixer, _attention_of(teacher, index))
        prefix = f"model.layers.{index}.{'mixer' if is_hybrid else 'self_attn'}."
        used.update(key for key in source if key.startswith(prefix))

    # Everything the teacher had must be used or be a replaced layer's attention (identity layers drop it).
    leftover = sorted(key for key in source if key not in used and ".self_attn." not in key and ".mixer." not in key)
    if leftover:
        raise ConversionError(f"weight surgery: teacher tensors not carried over: {leftover[:5]}")


def mixer_generator(seed: int, layer: int, draw: int = 0) -> torch.Generator:
    """The CPU generator a converted mixer's random parameters come from: one stream per (seed, layer,
    draw), independent of the device, of the global RNG and of which other layers are converted. Draw 0 is
    what a conversion uses; an MMR trial's k-th initialisation uses draw k."""
    digest = hashlib.sha256(f"hybrid-distill/mixer-init/{seed}/{layer}/{draw}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """`tensor` <- N(0, std^2), drawn in fp32 on the CPU from `generator`, then copied to its device and dtype."""
    drawn = torch.empty(tensor.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=generator)
    tensor.copy_(drawn)


@torch.no_grad()
def initialise_mamba(mixer: MambaMixer, generator: torch.Generator, std: float) -> None:
    """Every parameter of a fresh Mamba mixer from `generator`, in a fixed order (the distributions of
    transformers' `_init_weights`, which a model built from its config uses): in_proj, dt_in_proj, conv1d and
    out_proj weights ~ N(0, std^2) with zero biases, then the SSM parameters (`init_ssm_parameters`:
    dt_proj ~ U(+-dt_rank^-0.5), the dt bias, A_log, D). MIL then overwrites the x / B / C rows and out_proj."""
    for module in (mixer.in_proj, mixer.dt_in_proj, mixer.conv1d, mixer.out_proj):
        _normal_(module.weight, std, generator)
        if module.bias is not None:
            module.bias.zero_()
    mixer.init_ssm_parameters(generator)


# The generator-taking initialiser of each mixer kind a conversion creates.
FRESH_INITIALISERS = {MambaMixer: initialise_mamba}


def initialise_fresh(mixer: nn.Module, generator: torch.Generator, config: HybridConfig) -> None:
    """A new mixer's parameters, all of them, from `generator` (see FRESH_INITIALISERS)."""
    initialiser = FRESH_INITIALISERS.get(type(mixer))
    if initialiser is None:
        raise ConversionError(f"no initialiser for a fresh {type(mixer).__name__}")
    initialiser(mixer, generator, config.initializer_range or 0.02)


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """The CPU's and `device`'s global random states restored on exit."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


@torch.no_grad()
def _mil_initialise(mixer: nn.Module, attention: nn.Module) -> None:
    """MIL: x <- v_proj, B <- k_proj, C <- q_proj, out_proj <- o_proj (biases too; z's bias zero)."""
    d_inner, d_xb = mixer.d_inner, mixer.d_xb
    # in_proj rows: [z (d_inner, random) | x (d_xb) | B (d_xb) | C (d_inner)]
    weight = mixer.in_proj.weight
    weight[d_inner: d_inner + d_xb].copy_(attention.v_proj.weight)
    weight[d_inner + d_xb: d_inner + 2 * d_xb].copy_(attention.k_proj.weight)
    weight[d_inner + 2 * d_xb:].copy_(attention.q_proj.weight)
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[:d_inner].zero_()
        mixer.in_proj.bias[d_inner: d_inner + d_xb].copy_(attention.v_proj.bias)
        mixer.in_proj.bias[d_inner + d_xb: d_inner + 2 * d_xb].copy_(attention.k_proj.bias)
        mixer.in_proj.bias[d_inner + 2 * d_xb:].copy_(attention.q_proj.bias)
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.copy_(attention.o_proj.bias)


@torch.no_grad()
def gdn_from_attention(mixer: nn.Module, attention: nn.Module) -> None:
    """A Gated DeltaNet mixer from the attention it replaces (after Fast-LLM's apriel2 "DIL" surgery, in the
    teacher's GQA shape so that every attention weight is kept): q <- q_proj, k <- k_proj, v <- v_proj,
    out_proj <- o_proj (biases too); the output gate z zeroed (silu(0) = 0: the new mixer starts out adding
    nothing, i.e. as the teacher with that layer's attention removed, which is what leave-one-out measured);
    the beta and decay inputs zeroed (beta = 0.5), A = 0.1 and dt_bias = 0 (a decay of 0.933 a token, a
    half-life of ten tokens); the conv the identity times 0.5 on the current token (silu's near-linear
    range; q and k are L2-normalised and the output RMS-normalised, so the scale drops out); the norm's
    weight 1. Nothing is random: the mixer is the same for every seed."""
    q_width, kv_width = mixer.q_width, mixer.kv_width
    weight = mixer.in_proj.weight  # rows: q | k | v | z | beta | alpha
    weight.zero_()
    weight[:q_width].copy_(attention.q_proj.weight)
    weight[q_width: q_width + kv_width].copy_(attention.k_proj.weight)
    weight[q_width + kv_width: q_width + 2 * kv_width].copy_(attention.v_proj.weight)
    if mixer.in_proj.bias is not None:
        bias = mixer.in_proj.bias
        bias.zero_()
        for offset, projection in ((0, attention.q_proj), (q_width, attention.k_proj),
                                   (q_width + kv_width, attention.v_proj)):
            if projection.bias is not None:
                bias[offset: offset + projection.bias.shape[0]].copy_(projection.bias)
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = GDN_CONV_TAP
    mixer.A_log.fill_(torch.log(torch.tensor(GDN_INITIAL_DECAY_RATE)).item())
    mixer.dt_bias.zero_()
    mixer.norm.weight.fill_(1.0)
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.zero_()
        if attention.o_proj.bias is not None:
            mixer.out_proj.bias.copy_(attention.o_proj.bias)


@contextmanager
def gdn_trial(model: HybridForCausalLM, layer: int, *,
              gdn_options: dict | None = None) -> Iterator[HybridForCausalLM]:
    """`model` itself with attention layer `layer` swapped for a Gated DeltaNet mixer initialised from it (an
    MMR trial of that kind), the attention mixer, the layer pattern and the Gated DeltaNet settings put back on
    exit, whatever happens inside. Only the new mixer is allocated. Nothing is random: the mixer is built
    without values and `gdn_from_attention` sets every parameter, so a trial takes no seed, draws from no
    generator, and gives the same mixer as `hybridize(model, gdn_layers=[layer])`."""
    if not isinstance(model, HybridForCausalLM):
        raise ConversionError(f"an MMR trial swaps a mixer of a hybrid, got {type(model).__name__}")
    unknown = sorted(set(gdn_options or {}) - set(GDN_OPTIONS))
    if unknown:
        raise ConversionError(f"unknown Gated DeltaNet option(s) {unknown}; valid: {sorted(GDN_OPTIONS)}")
    config = model.config
    (layer,) = _layer_list("gdn_layers", [layer], config.num_hidden_layers)
    if config.layer_types[layer] != ATTENTION:
        raise ConversionError(f"layer {layer} is already {_kind_name(config.layer_types[layer])}; only attention "
                              "layers can be converted")
    block = model.model.layers[layer]
    attention, layer_types = block.mixer, list(config.layer_types)
    saved = {name: getattr(config, name) for name in ("gdn_conv_kernel", "gdn_in_proj_bias", "gdn_out_proj_bias")}
    parameter = next(model.parameters())
    try:
        _set_gdn_settings(config, {GDN_OPTIONS[k]: v for k, v in (gdn_options or {}).items() if v is not None},
                          config.attention_bias, config.attention_out_bias)
        config.layer_types = [GDN if index == layer else kind for index, kind in enumerate(layer_types)]
        check_gdn_shape(config)
        with torch.device("meta"):  # shapes only: gdn_from_attention sets every value
            mixer = build_mixer(config, layer)
        # cast before initialising, as hybridize does (A_log and dt_bias stay fp32)
        mixer.to_empty(device=parameter.device).to(parameter.dtype)
        gdn_from_attention(mixer, attention)
        block.mixer = mixer
        yield model
    finally:
        block.mixer = attention
        config.layer_types = layer_types
        for name, value in saved.items():
            setattr(config, name, value)


@contextmanager
def mamba_trial(model: HybridForCausalLM, layer: int, *, seed: int = 0,
                draw: int = 0) -> Iterator[HybridForCausalLM]:
    """`model` itself with attention layer `layer` swapped for a MIL-initialised Mamba mixer (an MMR trial),
    the attention mixer and the layer pattern put back on exit, whatever happens inside.

    Only the one new mixer is allocated, not a copy of the model. Its random parts (z rows, dt, conv) come
    from `mixer_generator(seed, layer, draw)`: with draw 0 the mixer is bit-identical to the one
    `hybridize(model, [layer], seed=seed)` makes; other draws are independent initialisations."""
    if not isinstance(model, HybridForCausalLM):
        raise ConversionError(f"an MMR trial swaps a mixer of a hybrid, got {type(model).__name__}")
    config = model.config
    (layer,) = _layer_list("mamba_layers", [layer], config.num_hidden_layers)
    if config.layer_types[layer] != ATTENTION:
        raise ConversionError(f"layer {layer} is already {_kind_name(config.layer_types[layer])}; only attention "
                              "layers can be converted")
    block = model.model.layers[layer]
    attention, layer_types = block.mixer, list(config.layer_types)
    parameter = next(model.parameters())
    config.layer_types = [MAMBA if index == layer else kind for index, kind in enumerate(layer_types)]
    try:
        with torch.device("meta"):  # shapes only: every value is set below
            mixer = build_mixer(config, layer)
        # cast before initialising, as hybridize does: a cast after it would round A_log and D to bf16
        mixer.to_empty(device=parameter.device).to(parameter.dtype)
        initialise_fresh(mixer, mixer_generator(seed, layer, draw), config)
        _mil_initialise(mixer, attention)
        block.mixer = mixer
        yield model
    finally:
        block.mixer = attention
        config.layer_types = layer_types


def _attention_of(teacher: nn.Module, index: int) -> nn.Module:
    layer = teacher.model.layers[index]
    return layer.mixer if isinstance(teacher, HybridForCausalLM) else layer.self_attn


__all__ = ["ConversionError", "FRESH_INITIALISERS", "GDN_OPTIONS", "SUPPORTED", "TEACHER_CLASSES", "check_gdn_shape",
           "check_teacher", "conversion_config", "gdn_from_attention", "gdn_trial", "hybrid_config_from_teacher",
           "hybridize", "initialise_fresh", "initialise_mamba", "mamba_trial", "mixer_generator"]
