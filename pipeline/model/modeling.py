"""`HybridForCausalLM`: the teacher's decoder with a per-layer choice of mixer.

Block: x + mixer(norm(x)), then + MLP(norm(x)) -- exactly the Llama/Mistral/Qwen2 block, so the norms,
MLPs, embeddings and head of a teacher copy over untouched. Weight names follow the teacher's with one
rename: `self_attn.` -> `mixer.` (see `pipeline.convert.hybridize`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from pipeline.model.cache import advance, cached_length, new_cache
from pipeline.model.config import HybridConfig
from pipeline.model.mixers import GatedDeltaNetMixer, MambaMixer, MixerContext, build_mixer

# transformers 5.24 renamed the cache field of model outputs from `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_of(outputs):
    """The cache a forward returned, whatever this transformers version calls the field."""
    return getattr(outputs, _CACHE_FIELD)


class HybridDecoderLayer(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = build_mixer(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor, context: MixerContext) -> torch.Tensor:
        update = self.mixer(self.input_layernorm(hidden), context)
        if update is not None:
            hidden = hidden + update
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # recurrent states cannot be rolled back (no assisted decoding / contrastive search)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linears, embeddings, norms, rotary buffers
        if isinstance(module, MambaMixer):
            module.init_ssm_parameters()
        elif isinstance(module, GatedDeltaNetMixer):
            module.init_gdn_parameters()


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = new_cache(self.config)
        if not use_cache:
            cache = None
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, H)
        batch, length = hidden.shape[:2]
        past = cached_length(cache, self.config)

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, past + new tokens), got shape {tuple(attention_mask.shape)}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:
                # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=hidden.device).expand(batch, -1)
        token_mask = attention_mask[:, -length:] if padded else None
        context = MixerContext(
            position_embeddings=self.rotary_emb(hidden, position_ids),
            attention_mask=self._attention_mask(attention_mask if padded else None, batch, length, past, hidden.device),
            token_mask=token_mask,
            cache=cache,
        )
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, context)
            else:
                hidden = layer(hidden, context)
        advance(cache, self.config, length)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{_CACHE_FIELD: cache})

    def _attention_mask(
        self, padding: torch.Tensor | None, batch: int, length: int, past: int, device: torch.device
    ) -> torch.Tensor | None:
        """(b, 1, t, s) bool, True = may attend; None when plain causal attention over the new tokens suffices."""
        window = self.config.sliding_window
        if padding is None and past == 0 and (window is None or window >= length):
            return None
        total = past + length
        query = torch.arange(past, total, device=device)[:, None]  # (t, 1)
        key = torch.arange(total, device=device)[None, :]  # (1, s)
        allowed = key <= query
        if window is not None:
            allowed = allowed & (query - key < window)
        allowed = allowed[None, None].expand(batch, 1, length, total)
        if padding is not None:
            # A padded query row would attend to nothing (NaN in SDPA); let it see itself. Its output is
            # never used: padding never enters a Mamba state and its logits are masked out.
            allowed = (allowed & padding[:, None, None, :].bool()) | (key == query)[None, None]
        return allowed


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, self_contained: bool = False, **kwargs):
        """transformers' save_pretrained; `self_contained=True` also writes the modeling code and an `auto_map`
        (loads with `trust_remote_code=True` where this package is not installed; see `pipeline.model.portable`)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self_contained:
            from pipeline.model.portable import write_modeling_code

            write_modeling_code(save_directory)
        return result

    def mamba_parameters(self):
        """(name, parameter) of every recurrent mixer a conversion made (Mamba and Gated DeltaNet): the
        trainable set of `trainable: mamba`."""
        for name, module in self.named_modules():
            if isinstance(module, (MambaMixer, GatedDeltaNetMixer)):
                for sub, parameter in module.named_parameters():
                    yield f"{name}.{sub}", parameter

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache_of(outputs)})


__all__ = ["cache_of", "HybridDecoderLayer", "HybridForCausalLM", "HybridModel", "HybridPreTrainedModel"]
