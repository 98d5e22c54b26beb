"""Token mixers: one interface, four implementations (attention, Mamba-1 with the MIL layout, Gated DeltaNet
in the teacher's GQA shape, identity).

A mixer is called as `mixer(hidden, context)` with hidden (b, l, H) already normalised and returns the
residual update (b, l, H), or None when it contributes nothing (identity). `MixerContext` carries what
any mixer may need: rotary embeddings, the attention mask, the token padding mask and the cache.
The decoder block never asks which mixer it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.model import kernels
from pipeline.model.cache import MambaCacheView, RecurrentCacheView
from pipeline.model.config import ATTENTION, GDN, IDENTITY, MAMBA, HybridConfig


@dataclass
class MixerContext:
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (b, l, e)
    attention_mask: torch.Tensor | None  # (b, 1, l, s) bool (True = attend), None = plain causal
    token_mask: torch.Tensor | None  # (b, l) 1 for real tokens, 0 for padding; None = no padding
    cache: object | None  # a transformers Cache built from config.layer_types, or None


class AttentionMixer(nn.Module):
    """The teacher's GQA self-attention with RoPE (weight names as in Llama/Mistral/Qwen2)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        hidden, q_width, kv_width = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=config.attention_out_bias)

    def forward(self, hidden: torch.Tensor, context: MixerContext) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (b,h,l,e)
        k = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = context.position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if context.cache is not None:
            k, v = context.cache.update(k, v, self.layer_idx)  # (b, h_kv, s, e)
        out = kernels.attention(
            q, k, v, context.attention_mask, self.scale, self.dropout if self.training else 0.0
        )  # (b, h, l, e)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def gqa_expansion_index(d_inner: int, d_xb: int, unit: int) -> torch.Tensor:
    """Source index in the d_xb-wide x/B for each of the d_inner expanded channels.

    The expanded width is cut into blocks of `unit` channels; block j copies source block j // r, with
    r = d_inner / d_xb. unit = d_state is the Apriel/M1 "chunk" repeat; unit = head_dim repeats each KV
    head's dims for the query heads that share it in attention ("head_aligned").
    """
    repeat = d_inner // d_xb
    channel = torch.arange(d_inner, device="cpu")  # explicit: models may be built under a meta-device context
    return (channel // unit // repeat) * unit + channel % unit


class MambaMixer(nn.Module):
    """Mamba-1 with the Mamba-in-Llama layout.

    in_proj gives z (d_inner), x (d_xb), B (d_xb), C (d_inner); x and B are expanded to d_inner (GQA
    expansion), x goes through the causal conv; B and C are split in groups of d_state channels;
    dt = softplus(dt_proj(dt_in_proj(h)) + dt_bias); A = -exp(A_log) in fp32.
    MIL initialisation maps x <- v_proj, B <- k_proj, C <- q_proj, out_proj <- o_proj.
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner = config.mamba_d_inner
        self.d_xb = config.mamba_d_xb
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.dt_rank = config.mamba_dt_rank
        self.groups = self.d_inner // self.d_state
        hidden = config.hidden_size
        self.in_proj = nn.Linear(hidden, 2 * self.d_inner + 2 * self.d_xb, bias=config.mamba_in_proj_bias)
        self.dt_in_proj = nn.Linear(hidden, self.dt_rank, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)  # its bias is dt_bias
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=0, bias=config.mamba_conv_bias
        )
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, hidden, bias=config.mamba_out_proj_bias)
        # Tags read by the optimiser set-up and the dtype casting: SSM parameters stay fp32, no decay.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.A_log._keep_fp32 = True
        self.D._keep_fp32 = True
        unit = self.d_state if config.mamba_gqa_expansion == "chunk" else config.head_dim
        # A derived constant, not a buffer: from_pretrained materialises models on the meta device and
        # would leave a non-persistent buffer uninitialised.
        self._expand_index = {"cpu": gqa_expansion_index(self.d_inner, self.d_xb, unit)}
        self._dt_min, self._dt_max, self._dt_floor = config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` and friends move A_log and D but keep them fp32 (the recurrence's precision).
        super()._apply(fn, recurse)
        for parameter in (self.A_log, self.D):
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
        return self

    # --- initialisers (named, so MIL and fresh init share them) ---
    @torch.no_grad()
    def init_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """A_log = log(1..d_state) per channel, D = 1, dt bias = softplus^-1 of log-uniform dt, dt_proj ~ U.

        The random values are drawn on the CPU (from `generator`, else torch's default CPU generator) and
        then copied to the mixer's device, so a seed gives the same values on every device. Uses
        transformers' `initialization` helpers, which skip tensors already loaded from a checkpoint.
        """
        cpu = torch.device("cpu")  # explicit: models may be built under another device's context
        init.copy_(self.A_log, torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=cpu))
                   .expand(self.d_inner, -1))
        init.ones_(self.D)
        std = self.dt_rank**-0.5
        weight = torch.empty(self.dt_proj.weight.shape, dtype=torch.float32, device=cpu).uniform_(
            -std, std, generator=generator)
        init.copy_(self.dt_proj.weight, weight)
        log_min, log_max = math.log(self._dt_min), math.log(self._dt_max)
        dt = torch.exp(torch.rand(self.d_inner, generator=generator, device=cpu) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=self._dt_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def expand_index(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._expand_index:
            self._expand_index[key] = self._expand_index["cpu"].to(device)
        return self._expand_index[key]

    def _split(self, hidden: torch.Tensor):
        """(b, l, H) -> z (b,d,l), x (b,d,l) expanded, B (b,g,n,l), C (b,g,n,l), dt (b,d,l) before bias."""
        batch, length, _ = hidden.shape
        z, x, B, C = self.in_proj(hidden).split([self.d_inner, self.d_xb, self.d_xb, self.d_inner], dim=-1)
        index = self.expand_index(hidden.device)
        x = x.index_select(-1, index)  # (b, l, d)
        B = B.index_select(-1, index)  # (b, l, d)
        B = B.view(batch, length, self.groups, self.d_state).permute(0, 2, 3, 1)  # (b, g, n, l)
        C = C.view(batch, length, self.groups, self.d_state).permute(0, 2, 3, 1)  # (b, g, n, l)
        dt = F.linear(self.dt_in_proj(hidden), self.dt_proj.weight)  # (b, l, d)
        return z.transpose(1, 2), x.transpose(1, 2), B.contiguous(), C.contiguous(), dt.transpose(1, 2)

    def step(
        self,
        hidden: torch.Tensor,  # (b, H) one token per sequence
        conv_state: torch.Tensor,  # (b, d, k) updated in place
        ssm_state: torch.Tensor,  # (b, d, n) fp32, updated in place
        token_mask: torch.Tensor | None = None,  # (b,) 0 where this token is padding
        *,
        projected: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One decode token: returns the mixer output (b, H) and advances both states in place.

        `projected`: (in_proj(hidden), dt_in_proj(hidden)) when the caller has computed them already (the
        engine does both in one GEMM); in_proj's output may carry extra columns after its own.
        """
        if projected is None:
            projected = (self.in_proj(hidden), self.dt_in_proj(hidden))
        proj, dt_low = projected
        y = kernels.mamba_decode_step(
            proj, F.linear(dt_low, self.dt_proj.weight), self.expand_index(hidden.device), self.d_xb,
            conv_state, self.conv1d.weight.view(self.d_inner, -1), self.conv1d.bias, ssm_state,
            -torch.exp(self.A_log.float()), self.A_log, self.D, self.dt_proj.bias, token_mask,
        )  # (b, d)
        return self.out_proj(y.to(hidden.dtype))

    def forward(self, hidden: torch.Tensor, context: MixerContext) -> torch.Tensor:
        batch, length, _ = hidden.shape
        state = MambaCacheView(context.cache, self.layer_idx) if context.cache is not None else None
        if state is not None and state.has_previous and length == 1:  # decode step
            token_mask = None if context.token_mask is None else context.token_mask[:, 0]
            return self.step(hidden[:, 0], state.conv, state.ssm, token_mask)[:, None, :]

        z, x, B, C, dt = self._split(hidden)
        mask = None if context.token_mask is None else context.token_mask[:, None, :].to(x.dtype)  # (b,1,l)
        if mask is not None:
            x = x * mask  # padding must not enter the conv window ...
        A = -torch.exp(self.A_log.float())  # (d, n)
        previous = state is not None and state.has_previous
        context_window = state.conv if previous else None
        u = kernels.causal_conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, context_window)  # (b, d, l)
        if mask is not None:
            u = u * mask  # ... nor, through the conv bias, the SSM state
        y, last_state = kernels.selective_scan(
            u, dt, A, B, C, self.D, z, self.dt_proj.bias,
            initial_state=state.ssm if previous else None,
            return_last_state=state is not None,
        )
        if state is not None:
            window = torch.cat([context_window.to(x.dtype), x], dim=-1) if previous else F.pad(
                x, (max(self.d_conv - length, 0), 0)
            )
            state.write(window[..., -self.d_conv:], last_state)
        return self.out_proj(y.transpose(1, 2).to(hidden.dtype))


GDN_NORM_EPS = 1e-5  # the gated norm's epsilon: Fast-LLM's (its GDN norm takes no epsilon from the config)


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's e_v channels, scaled, times silu(gate): rms(o) * weight * silu(z) (fp32 inside)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32 * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNetMixer(nn.Module):
    """Gated DeltaNet (Yang et al., as in Qwen3-Next and Fast-LLM) in the GQA shape of the teacher's attention.

    in_proj gives q (h e), k (g e), v (g e), z (h e), beta (h) and alpha (h), with h = gdn_num_heads, g =
    gdn_num_kv_heads, e = gdn_head_dim; q, k, v go through a causal depthwise conv and silu; q and k are
    L2-normalised per head; k and v are expanded to h heads (head i reads KV head i // (h / g), as attention
    pairs them); beta = sigmoid(beta), decay g_t = -exp(A_log) softplus(alpha + dt_bias); the gated delta rule
    (`kernels.gated_delta_rule`) gives o (h heads of e), then rms(o) * norm.weight * silu(z) per head, out_proj.
    With h, g, e the teacher's heads and head dim, q/k/v/o have the shapes of q_proj/k_proj/v_proj/o_proj:
    `pipeline.convert.hybridize` initialises the mixer from them. A_log and dt_bias stay fp32.
    Cache: the conv window (b, (h + 2 g) e, k) of the last conv inputs and the state (b, h, e, e) fp32.
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.gdn_num_heads, config.gdn_num_kv_heads
        self.head_dim, self.d_conv = config.gdn_head_dim, config.gdn_conv_kernel
        self.q_width = self.num_heads * self.head_dim
        self.kv_width = self.num_kv_heads * self.head_dim
        self.conv_width = self.q_width + 2 * self.kv_width  # channels of the conv: q | k | v
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        # rows: q (h e) | k (g e) | v (g e) | z (h e) | beta (h) | alpha (h)
        self.in_proj = nn.Linear(hidden, self.conv_width + self.q_width + 2 * self.num_heads,
                                 bias=config.gdn_in_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_width, self.conv_width, self.d_conv, groups=self.conv_width, padding=0,
                                bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.head_dim, GDN_NORM_EPS)
        self.out_proj = nn.Linear(self.q_width, hidden, bias=config.gdn_out_proj_bias)
        for parameter in (self.A_log, self.dt_bias):  # read by the optimiser set-up and `_apply`
            parameter._no_weight_decay = True
            parameter._keep_fp32 = True

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` and friends move A_log and dt_bias but keep them fp32 (the decay's precision)
        super()._apply(fn, recurse)
        for parameter in (self.A_log, self.dt_bias):
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
        return self

    @torch.no_grad()
    def init_gdn_parameters(self, generator: torch.Generator | None = None) -> None:
        """A = U(1, 16) per head (A_log = log A), dt_bias = softplus^-1 of a log-uniform dt in [1e-3, 0.1], as in
        Mamba-2 / Qwen3-Next; the norm's weight 1. (A conversion from attention overwrites these, see
        `pipeline.convert.hybridize.gdn_from_attention`.) The random values are drawn on the CPU (from
        `generator`, else torch's default CPU generator) and then copied to the mixer's device, as
        `MambaMixer.init_ssm_parameters` does. transformers' `initialization` helpers skip tensors already
        loaded from a checkpoint."""
        cpu = torch.device("cpu")  # explicit: models may be built under another device's context
        init.copy_(self.A_log, torch.empty(self.num_heads, device=cpu).uniform_(1, 16, generator=generator).log())
        dt = torch.exp(torch.rand(self.num_heads, generator=generator, device=cpu) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        init.ones_(self.norm.weight)

    def _split(self, proj: torch.Tensor):
        """in_proj's output (..., W) -> qkv (..., (h + 2 g) e), z (..., h e), beta logits (..., h), alpha (..., h)."""
        return proj[..., : self.conv_width + self.q_width + 2 * self.num_heads].split(
            [self.conv_width, self.q_width, self.num_heads, self.num_heads], dim=-1)

    def _heads(self, u: torch.Tensor):
        """Conv output (..., (h + 2 g) e) -> q (..., h, e), k and v (..., h, e) expanded from their g heads."""
        q, k, v = u.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        shape = u.shape[:-1]
        repeat = self.num_heads // self.num_kv_heads
        q = q.reshape(*shape, self.num_heads, self.head_dim)
        k = k.reshape(*shape, self.num_kv_heads, self.head_dim).repeat_interleave(repeat, dim=-2)
        v = v.reshape(*shape, self.num_kv_heads, self.head_dim).repeat_interleave(repeat, dim=-2)
        return q, k, v

    def _gates(self, beta_logit: torch.Tensor, alpha: torch.Tensor):
        """(beta in [0, 1], log decay g <= 0), both fp32, shaped like their inputs (..., h)."""
        beta = torch.sigmoid(beta_logit.float())
        g = -torch.exp(self.A_log.float()) * F.softplus(alpha.float() + self.dt_bias.float())
        return beta, g

    def _output(self, o: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """o (..., h, e_v), z (..., h e) -> out_proj(gated norm) (..., H)."""
        gated = self.norm(o, z.reshape(o.shape))
        return self.out_proj(gated.reshape(*o.shape[:-2], self.q_width).to(dtype))

    def step(
        self,
        hidden: torch.Tensor,  # (b, H) one token per sequence
        conv_state: torch.Tensor,  # (b, (h + 2 g) e, k) updated in place
        state: torch.Tensor,  # (b, h, e, e) fp32, updated in place
        token_mask: torch.Tensor | None = None,  # (b,) 0 where this token is padding
        *,
        projected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode token: returns the mixer output (b, H) and advances both states in place (no host syncs:
        the engine captures it in a CUDA graph). `projected`: in_proj(hidden) when the caller has it."""
        qkv, z, beta_logit, alpha = self._split(self.in_proj(hidden) if projected is None else projected)
        mask = None if token_mask is None else token_mask[:, None].to(qkv.dtype)
        if mask is not None:
            qkv = qkv * mask
        u = kernels.causal_conv_step(qkv, conv_state, self.conv1d.weight.view(self.conv_width, -1), None)  # (b, C)
        q, k, v = self._heads(u)
        beta, g = self._gates(beta_logit, alpha)
        if mask is not None:  # a padding token neither decays nor writes the state
            beta, g = beta * mask, g * mask
        o = kernels.gated_delta_rule_step(state, q, k, v, g, beta, self.scale)  # (b, h, e)
        return self._output(o, z, hidden.dtype)

    def forward(self, hidden: torch.Tensor, context: MixerContext) -> torch.Tensor:
        batch, length, _ = hidden.shape
        cache = RecurrentCacheView(context.cache, self.layer_idx) if context.cache is not None else None
        if cache is not None and cache.has_previous and length == 1:  # decode step
            token_mask = None if context.token_mask is None else context.token_mask[:, 0]
            return self.step(hidden[:, 0], cache.conv, cache.state, token_mask)[:, None, :]

        qkv, z, beta_logit, alpha = self._split(self.in_proj(hidden))
        x = qkv.contiguous().transpose(1, 2)  # (b, C, l), channels innermost (causal_conv1d's channel-last layout)
        mask = None if context.token_mask is None else context.token_mask[:, None, :].to(x.dtype)  # (b, 1, l)
        if mask is not None:
            x = x * mask  # padding must not enter the conv window ...
        previous = cache is not None and cache.has_previous
        window = cache.conv if previous else None
        u = kernels.causal_conv(x, self.conv1d.weight.squeeze(1), None, window)  # silu(conv): (b, C, l)
        if mask is not None:
            u = u * mask
        q, k, v = self._heads(u.transpose(1, 2))  # (b, l, h, e)
        beta, g = self._gates(beta_logit, alpha)  # (b, l, h)
        if mask is not None:  # ... nor decay or write the state
            beta, g = beta * mask[:, 0, :, None], g * mask[:, 0, :, None]
        o, last = kernels.gated_delta_rule(q, k, v, g, beta, self.scale,
                                           initial_state=cache.state if previous else None,
                                           return_last_state=cache is not None)
        if cache is not None:
            inputs = torch.cat([window.to(x.dtype), x], dim=-1) if previous else F.pad(
                x, (max(self.d_conv - length, 0), 0))
            cache.write(inputs[..., -self.d_conv:], last)
        return self._output(o, z, hidden.dtype)


class IdentityMixer(nn.Module):
    """No token mixing: the block reduces to its MLP (used by leave-one-out)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden: torch.Tensor, context: MixerContext) -> None:
        return None


MIXERS: dict[str, type[nn.Module]] = {ATTENTION: AttentionMixer, MAMBA: MambaMixer, GDN: GatedDeltaNetMixer,
                                      IDENTITY: IdentityMixer}


def build_mixer(config: HybridConfig, layer_idx: int) -> nn.Module:
    return MIXERS[config.layer_types[layer_idx]](config, layer_idx)


__all__ = ["AttentionMixer", "GatedDeltaNetMixer", "GatedRMSNorm", "IdentityMixer", "MambaMixer", "MixerContext",
           "build_mixer", "gqa_expansion_index"]
