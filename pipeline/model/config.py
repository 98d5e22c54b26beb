"""`HybridConfig`: a decoder whose layers each hold one mixer (attention, Mamba, Gated DeltaNet or none).

Layer kinds follow transformers' own vocabulary for `config.layer_types` where it has one, so that
`DynamicCache(config=...)` builds the right per-layer cache:

| our name  | `layer_types` entry  | mixer                               | cache layer (transformers)       |
| --------- | -------------------- | ----------------------------------- | -------------------------------- |
| attention | `"full_attention"`   | the teacher's attention (GQA, RoPE) | K/V (`DynamicLayer`)             |
| mamba     | `"linear_attention"` | Mamba-1 with the MIL layout         | conv + SSM state (`LinearAttentionLayer`) |
| gdn       | `"gated_delta_net"`  | Gated DeltaNet in the teacher's GQA shape | conv + delta-rule state (`LinearAttentionLayer`, registered by `pipeline.model.cache`) |
| identity  | `"mlp"`              | none: the block is norm -> MLP only | none (dummy / empty layer)       |

`"mlp"` is the name NemotronH uses for a block without a token mixer; transformers maps it to a cache
layer that stores nothing. The short names (`attention`, `mamba`, `gdn`, `identity`) are accepted on
input and rewritten to the canonical ones. Beware one clash of vocabularies: transformers' Qwen3-Next
calls its Gated DeltaNet layers `"linear_attention"`; here that entry means Mamba-1 (the meaning every
checkpoint of this project is written with, so all of them load unchanged), and Gated DeltaNet is
`"gated_delta_net"` (Fast-LLM's name for it in `layer_types`).

Glossary where our names meet Mamba's / HF's: d_inner = "intermediate_size" of Jamba's mixer =
n_heads x head_dim; d_xb = n_kv_heads x head_dim (width of x and B before the GQA expansion);
d_state = "ssm_state_size"; dt_rank = "time_step_rank"; d_conv = "conv_kernel".
Gated DeltaNet: gdn_num_heads = Qwen3-Next's linear_num_value_heads (heads of q, of the state and of the
gates); gdn_num_kv_heads = the heads of k and v before their GQA expansion (Fast-LLM / Qwen3-Next have
no counterpart: their q and k share one head count); gdn_head_dim = linear_key_head_dim =
linear_value_head_dim; gdn_conv_kernel = linear_conv_kernel_dim.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

ATTENTION = "full_attention"
MAMBA = "linear_attention"
GDN = "gated_delta_net"
IDENTITY = "mlp"
LAYER_KINDS = (ATTENTION, MAMBA, GDN, IDENTITY)
RECURRENT_KINDS = (MAMBA, GDN)  # the kinds a conversion creates (each holds a conv window and a state)
LAYER_KIND_ALIASES = {
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "gdn": GDN,
    "gated_delta_net": GDN,
    "gated_deltanet": GDN,
    "identity": IDENTITY,
    "mlp": IDENTITY,
}
KIND_NAMES = {ATTENTION: "attention", MAMBA: "mamba", GDN: "gdn", IDENTITY: "identity"}  # short names
PATTERN_CHARS = {ATTENTION: "A", MAMBA: "M", GDN: "G", IDENTITY: "I"}
GDN_FIELDS = ("gdn_num_heads", "gdn_num_kv_heads", "gdn_head_dim", "gdn_conv_kernel", "gdn_in_proj_bias",
              "gdn_out_proj_bias")
GQA_EXPANSIONS = ("chunk", "head_aligned")


def pattern_of(layer_types: list[str] | tuple[str, ...], other: str | None = None) -> str:
    """One character a layer, as PATTERN_CHARS maps canonical kinds: A attention, M Mamba, G Gated DeltaNet,
    I identity. A kind outside PATTERN_CHARS gives `other`, or a KeyError when `other` is None."""
    if other is None:
        return "".join(PATTERN_CHARS[kind] for kind in layer_types)
    return "".join(PATTERN_CHARS.get(kind, other) for kind in layer_types)


def attention_pattern(layers: int) -> str:
    """The pattern of a plain transformer (a teacher) with `layers` layers: all attention."""
    return pattern_of([ATTENTION] * layers)


class HybridConfigError(ValueError):
    """A hybrid configuration that cannot describe a model."""


def canonical_layer_types(layer_types: list[str] | tuple[str, ...]) -> list[str]:
    """Rewrite short names to transformers' vocabulary; one clear error for anything else."""
    out = []
    for index, kind in enumerate(layer_types):
        if kind not in LAYER_KIND_ALIASES:
            valid = ", ".join(f"{alias!r}" for alias in LAYER_KIND_ALIASES)
            raise HybridConfigError(f"unknown layer type {kind!r} at layer {index}; valid types: {valid}")
        out.append(LAYER_KIND_ALIASES[kind])
    return out


@strict
class HybridConfig(PretrainedConfig):
    """Config of `HybridForCausalLM`: a Llama/Mistral/Qwen2-style decoder with per-layer mixers."""

    model_type = "apriel_hybrid_distill"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    # The teacher's decoder (names as in LlamaConfig so norms, MLPs and RoPE read them unchanged).
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True; Llama's attention_bias: True)
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias: True; Qwen2: False)
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-style window over keys, None = full causal attention

    # Which mixer each layer holds: entries of LAYER_KINDS (short aliases accepted).
    layer_types: list[str] | None = None

    # Mamba-1 mixers with the MIL layout (defaults: the Apriel-H1 recipe).
    mamba_d_state: int = 16
    mamba_dt_rank: int = 16
    mamba_d_conv: int = 4
    mamba_d_inner: int | None = None  # default n_heads x head_dim
    mamba_d_xb: int | None = None  # default n_kv_heads x head_dim
    mamba_gqa_expansion: str = "chunk"  # "chunk" (Apriel/M1 layout) or "head_aligned"
    mamba_conv_bias: bool = True
    mamba_in_proj_bias: bool = False  # True when the teacher's q/k/v have biases (Qwen2)
    mamba_out_proj_bias: bool = False  # True when the teacher's o_proj has a bias
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4

    # Gated DeltaNet mixers (defaults: the teacher's attention shape, so attention weights copy over).
    # Written to config.json only by a config with Gated DeltaNet layers (see `to_dict`).
    gdn_num_heads: int | None = None  # heads of q, z, beta, the decay and the state; default num_attention_heads
    gdn_num_kv_heads: int | None = None  # heads of k and v, each shared by gdn_num_heads / this; default num_key_value_heads
    gdn_head_dim: int | None = None  # key and value head dim; default head_dim
    gdn_conv_kernel: int = 4  # the causal depthwise conv over q, k, v
    gdn_in_proj_bias: bool = False  # True when the teacher's q/k/v have biases (Qwen2)
    gdn_out_proj_bias: bool = False  # True when the teacher's o_proj has a bias

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [ATTENTION] * self.num_hidden_layers
        self.layer_types = canonical_layer_types(self.layer_types)
        if self.mamba_d_inner is None:
            self.mamba_d_inner = self.num_attention_heads * self.head_dim
        if self.mamba_d_xb is None:
            self.mamba_d_xb = self.num_key_value_heads * self.head_dim
        if self.gdn_num_heads is None:
            self.gdn_num_heads = self.num_attention_heads
        if self.gdn_num_kv_heads is None:
            self.gdn_num_kv_heads = self.num_key_value_heads
        if self.gdn_head_dim is None:
            self.gdn_head_dim = self.head_dim
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        # Our own checks first, so a user sees one plain line rather than the strict-dataclass wrapper.
        self.validate_layer_type()
        self.validate_architecture()
        super().__post_init__(**kwargs)

    # --- validation (run by @strict at init and again by save_pretrained) ---
    def validate_layer_type(self):
        """Every entry a known mixer kind; one entry per layer."""
        canonical_layer_types(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise HybridConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )

    def validate_architecture(self):
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise HybridConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mamba_gqa_expansion not in GQA_EXPANSIONS:
            raise HybridConfigError(
                f"unknown mamba_gqa_expansion {self.mamba_gqa_expansion!r}; valid: {', '.join(GQA_EXPANSIONS)}"
            )
        for name in ("mamba_d_inner", "mamba_d_xb"):
            if getattr(self, name) % self.mamba_d_state != 0:
                raise HybridConfigError(
                    f"{name} ({getattr(self, name)}) is not divisible by mamba_d_state ({self.mamba_d_state})"
                )
        if self.mamba_d_inner % self.mamba_d_xb != 0:
            raise HybridConfigError(
                f"mamba_d_inner ({self.mamba_d_inner}) is not a multiple of mamba_d_xb ({self.mamba_d_xb})"
            )
        if self.mamba_gqa_expansion == "head_aligned" and self.head_dim % self.mamba_d_state != 0:
            raise HybridConfigError(
                f"head_aligned expansion needs head_dim ({self.head_dim}) divisible by mamba_d_state "
                f"({self.mamba_d_state})"
            )
        if self.mamba_d_conv < 1 or self.mamba_dt_rank < 1:
            raise HybridConfigError("mamba_d_conv and mamba_dt_rank must be >= 1")
        if min(self.gdn_num_heads, self.gdn_num_kv_heads, self.gdn_head_dim, self.gdn_conv_kernel) < 1:
            raise HybridConfigError("gdn_num_heads, gdn_num_kv_heads, gdn_head_dim and gdn_conv_kernel must be >= 1")
        if self.gdn_num_heads % self.gdn_num_kv_heads != 0:
            raise HybridConfigError(f"gdn_num_heads ({self.gdn_num_heads}) is not a multiple of gdn_num_kv_heads "
                                    f"({self.gdn_num_kv_heads})")

    def to_dict(self) -> dict:
        """transformers' to_dict, without the Gated DeltaNet settings when no layer is Gated DeltaNet: configs
        without such layers (every Mamba-only checkpoint) serialise exactly as before those settings existed."""
        out = super().to_dict()
        if GDN not in (self.layer_types or []):
            for name in GDN_FIELDS:
                out.pop(name, None)
        return out

    # --- derived views ---
    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == MAMBA]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == ATTENTION]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == GDN]

    @property
    def recurrent_layers(self) -> list[int]:
        """Layers a conversion made (Mamba or Gated DeltaNet): the K of a checkpoint's name H-K."""
        return [i for i, kind in enumerate(self.layer_types) if kind in RECURRENT_KINDS]

    @property
    def identity_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == IDENTITY]

    @property
    def layer_pattern(self) -> str:
        """One character a layer: A attention, M Mamba, G Gated DeltaNet, I identity (for tags and logs)."""
        return pattern_of(self.layer_types)


__all__ = [
    "ATTENTION",
    "GDN",
    "GDN_FIELDS",
    "GQA_EXPANSIONS",
    "HybridConfig",
    "HybridConfigError",
    "IDENTITY",
    "KIND_NAMES",
    "LAYER_KINDS",
    "MAMBA",
    "PATTERN_CHARS",
    "RECURRENT_KINDS",
    "attention_pattern",
    "canonical_layer_types",
    "pattern_of",
]
