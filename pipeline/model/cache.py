"""The generation cache: transformers' own `DynamicCache(config=...)`, read and written per layer.

`DynamicCache(config=hybrid_config)` builds a K/V layer for every "full_attention" entry of
`config.layer_types`, a `LinearAttentionLayer` (conv state + recurrent state) for every
"linear_attention" (Mamba) entry and every "gated_delta_net" (Gated DeltaNet) entry, and an empty layer
for "mlp" (identity). transformers has no "gated_delta_net" entry of its own: importing this module adds
it to its cache-layer tables (`DYNAMIC_LAYER_TYPE_MAPPING` and `STATIC_LAYER_TYPE_MAPPING` of
`transformers.cache_utils`, 5.17 and 5.24 alike), mapped to `LinearAttentionLayer`, as a modeling file of
transformers' own registers its layer kinds. The getters and setters on
the cache object changed names between transformers 5.17 and 5.21+, but the per-layer fields
(`conv_states[0]`, `recurrent_states[0]`, `has_previous_state[0]`, `update_conv_state`,
`update_recurrent_state`) are the same in both, so this module uses those alone.

Mamba states, fp32: conv (b, d_inner, d_conv) = the last d_conv inputs of the conv (oldest first);
ssm (b, d_inner, d_state). Gated DeltaNet states, fp32: conv (b, (h + 2 g) e, k) likewise; the delta-rule
state (b, h, e, e).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers import cache_utils

from pipeline.model.config import GDN, HybridConfig


def register_cache_layer_kinds() -> None:
    """Teach transformers' caches the Gated DeltaNet layer kind: a conv window and a recurrent state, as for
    Mamba (`LinearAttentionLayer`). Idempotent; leaves an existing entry of that name alone."""
    for table in ("DYNAMIC_LAYER_TYPE_MAPPING", "STATIC_LAYER_TYPE_MAPPING"):
        getattr(cache_utils, table).setdefault(GDN, cache_utils.LinearAttentionLayer)


register_cache_layer_kinds()


def new_cache(config: HybridConfig) -> DynamicCache:
    return DynamicCache(config=config)


class RecurrentCacheView:
    """The two states of one recurrent layer (Mamba or Gated DeltaNet) of a transformers cache."""

    def __init__(self, cache, layer_idx: int):
        self.layer = cache.layers[layer_idx]
        if not hasattr(self.layer, "conv_states"):
            raise TypeError(
                f"cache layer {layer_idx} is a {type(self.layer).__name__}, not a linear-attention layer: build the "
                "cache from the model's config (DynamicCache(config=model.config))"
            )

    @property
    def has_previous(self) -> bool:
        return bool(self.layer.has_previous_state[0])

    @property
    def conv(self) -> torch.Tensor:
        return self.layer.conv_states[0]

    @property
    def state(self) -> torch.Tensor:
        return self.layer.recurrent_states[0]

    ssm = state  # Mamba's name for it

    def write(self, conv_window: torch.Tensor, state: torch.Tensor) -> None:
        """Store the last conv inputs (b, channels, k) and the recurrent state (Mamba: (b, d, n); Gated
        DeltaNet: (b, h, e, e)), both fp32."""
        conv_window = conv_window.float().contiguous()
        self.layer.update_conv_state(conv_window, conv_kernel_size=conv_window.shape[-1])
        self.layer.update_recurrent_state(state.float())


MambaCacheView = RecurrentCacheView  # the name callers used before Gated DeltaNet


def cached_length(cache, config: HybridConfig) -> int:
    """Tokens already in the cache. Attention layers know it; a model without any keeps a counter."""
    if cache is None:
        return 0
    attention = config.attention_layers
    if attention:
        return cache.layers[attention[0]].get_seq_length() if len(cache.layers) > attention[0] else 0
    return getattr(cache, "_hybrid_seen_tokens", 0)


def advance(cache, config: HybridConfig, new_tokens: int) -> None:
    if cache is not None and not config.attention_layers:
        cache._hybrid_seen_tokens = getattr(cache, "_hybrid_seen_tokens", 0) + new_tokens


__all__ = ["MambaCacheView", "RecurrentCacheView", "advance", "cached_length", "new_cache",
           "register_cache_layer_kinds"]
