"""Kernel dispatch: fast CUDA kernels where they exist, a pure-PyTorch reference everywhere else.

Every op here has both paths; which one runs is decided explicitly by `kernel_mode()` and the inputs,
and logged once per op. Modes (environment variable `HYBRID_KERNELS`, or `set_kernel_mode`):
- "auto" (default): CUDA kernels when the tensors are on CUDA and the packages import, else reference.
- "reference": always the PyTorch reference (what the parity tests compare against).
- "cuda": CUDA kernels required; a missing package is an error that says what to install.

Shapes, one notation throughout: b batch, d channels (d_inner), n state size (d_state), g groups of B/C,
l sequence length, k conv width, h heads, t query length, s key length, e head dim (e_v: of values).

Ops: the Mamba-1 selective scan and its decode step (mamba_ssm), the causal depthwise conv and its step
(causal_conv1d), attention (flash-attn / SDPA), and the gated delta rule of Gated DeltaNet with its
decode step (flash-linear-attention's `fla-core`: `chunk_gated_delta_rule`,
`fused_recurrent_gated_delta_rule`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "reference", "cuda")
_mode: str | None = None
_announced: set[tuple[str, str]] = set()


class KernelUnavailableError(RuntimeError):
    """CUDA kernels were required but cannot be used."""


def kernel_mode() -> str:
    mode = _mode or os.environ.get("HYBRID_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"HYBRID_KERNELS={mode!r} is not a kernel mode; valid: {', '.join(KERNEL_MODES)}")
    return mode


def set_kernel_mode(mode: str | None) -> None:
    """Set the kernel mode for this process (None = back to the environment / "auto")."""
    global _mode
    if mode is not None and mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(KERNEL_MODES)}")
    _mode = mode


@contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Temporarily force a kernel mode (tests run both paths with this)."""
    previous = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


def _announce(op: str, path: str) -> None:
    if (op, path) not in _announced:
        _announced.add((op, path))
        log.info("kernel %s: %s", op, path)


def paths_used() -> dict[str, list[str]]:
    """Which implementation each op has used in this process (for logs and benchmark records)."""
    out: dict[str, list[str]] = {}
    for op, path in sorted(_announced):
        out.setdefault(op, []).append(path)
    return out


# --- optional packages -------------------------------------------------------------------------

@functools.cache
def _mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as error:  # ImportError, or a CUDA extension that fails to load
        return None, f"mamba_ssm unavailable ({type(error).__name__}: {error})"
    return (_opaque(selective_scan_fn), selective_state_update), ""


@functools.cache
def _causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as error:
        return None, f"causal_conv1d unavailable ({type(error).__name__}: {error})"
    return (_opaque(causal_conv1d_fn), causal_conv1d_update), ""


@functools.cache
def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except Exception as error:
        return None, f"flash_attn unavailable ({type(error).__name__}: {error})"
    return _opaque(flash_attn_func), ""


@functools.cache
def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as error:  # ImportError (fla-core, or its einops / triton), or a failing Triton set-up
        return None, f"fla-core unavailable ({type(error).__name__}: {error})"
    return (_opaque(chunk_gated_delta_rule), fused_recurrent_gated_delta_rule), ""


def _opaque(function):
    """`function` hidden from torch.compile: the extension kernels (mamba_ssm, causal_conv1d, flash-attn)
    are autograd Functions over C++ calls that dynamo cannot trace; a compiled block breaks its graph
    around them cleanly instead of trying."""
    return torch.compiler.disable(function, recursive=True)


@torch.compiler.disable  # runs eagerly (imports, logging): a compiled block breaks its graph here
def _use_cuda(op: str, tensor: torch.Tensor, loader, *, required_by_mode: bool = True):
    """The CUDA functions for `op` if this call should use them, else None (reference)."""
    mode = kernel_mode()
    if mode == "reference":
        return None
    functions, reason = loader()
    if not tensor.is_cuda:
        if mode == "cuda" and required_by_mode:
            raise KernelUnavailableError(f"HYBRID_KERNELS=cuda but {op} got a {tensor.device.type} tensor")
        return None
    if functions is None:
        if mode == "cuda" and required_by_mode:
            raise KernelUnavailableError(
                f"HYBRID_KERNELS=cuda but {reason}; install the GPU extras: pip install 'hybrid-distill[gpu]' "
                "(DEVELOPERS.md: bringing the wheels to a machine without a package index)"
            )
        _announce(op, f"reference ({reason})")
        return None
    return functions


# --- selective scan (prefill / training) ---------------------------------------------------------

def selective_scan(
    u: torch.Tensor,  # (b, d, l) input after conv + activation
    delta: torch.Tensor,  # (b, d, l) dt before bias and softplus
    A: torch.Tensor,  # (d, n) fp32, negative
    B: torch.Tensor,  # (b, g, n, l)
    C: torch.Tensor,  # (b, g, n, l)
    D: torch.Tensor,  # (d,)
    z: torch.Tensor,  # (b, d, l) gate
    delta_bias: torch.Tensor,  # (d,)
    initial_state: torch.Tensor | None = None,  # (b, d, n) fp32
    return_last_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = (C . h + D u) * silu(z) with h_t = exp(dt_t A) h_(t-1) + dt_t B_t u_t; returns (y (b,d,l), h_l (b,d,n) fp32).

    The CUDA kernel has no initial-state input, so a continuation from a cached state (a multi-token
    step after a prefill) runs the reference scan. Its backward ignores any gradient of the last state,
    so on that path the last state comes back detached (it only ever feeds a generation cache).
    """
    functions = _use_cuda("selective_scan", u, _mamba_ssm, required_by_mode=initial_state is None)
    if functions is not None and initial_state is None:
        _announce("selective_scan", "mamba_ssm.selective_scan_fn (CUDA)")
        result = functions[0](
            u, delta, A, B, C, D.float(), z=z, delta_bias=delta_bias.float(), delta_softplus=True,
            return_last_state=return_last_state,
        )
        if return_last_state:
            return result[0], result[1].detach().float()
        return result, None
    _announce("selective_scan", "PyTorch chunked reference")
    y, last_state = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return y, (last_state if return_last_state else None)


# Within one chunk the scan factors exp(S_t - S_s) as exp(S_t) * exp(-S_s). With chunks of 4 tokens and a
# floor of -20 on one token's log-decay, |S| <= 80 keeps both factors inside fp32's range
# (e^80 ~ 5.5e34, e^-80 ~ 1.8e-35 > the smallest normal), and the floor (a decay factor of 2e-9 a token)
# changes a state by at most 2e-9 of its previous value.
SCAN_CHUNK = 4
MIN_LOG_DECAY = -20.0


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked, vectorised scan in fp32; work and memory O(b d n l), no Python loop over tokens.

    Tokens are cut into chunks of SCAN_CHUNK. Inside every chunk at once, with S the cumulative log-decay
    from the chunk's start, h_t = exp(S_t) * cumsum_s(exp(-S_s) * dt_s B_s u_s) (zero entering state);
    then a loop over chunks (not tokens) carries the state h_entering = exp(S_end) h_prev + h_local_end
    and adds exp(S_t) * h_entering back. To keep exp(+-S) finite, one token's log-decay dt*A is floored
    at MIN_LOG_DECAY (see above).
    """
    chunk = SCAN_CHUNK
    batch, channels, length = u.shape
    groups, n = B.shape[1], B.shape[2]
    per_group = channels // groups  # channels sharing one B/C group: broadcast, never materialised
    out_dtype = u.dtype
    u32 = u.float()
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])  # (b, d, l)
    pad = (-length) % chunk  # padding: decay 1 and drive 0, so the state passes through unchanged
    if pad:
        dt, u32_padded = F.pad(dt, (0, pad)), F.pad(u32, (0, pad))
        B, C = F.pad(B.float(), (0, pad)), F.pad(C.float(), (0, pad))
    else:
        u32_padded = u32
    chunks = (length + pad) // chunk
    # (b, d, l) -> (b, g, r, 1, k, c) and (b, g, n, l) -> (b, g, 1, n, k, c); r = per_group, k*c = l
    dt6 = dt.view(batch, groups, per_group, 1, chunks, chunk)
    A6 = A.float().view(1, groups, per_group, n, 1, 1)
    B6 = B.float().view(batch, groups, 1, n, chunks, chunk)
    C6 = C.float().view(batch, groups, 1, n, chunks, chunk)
    log_decay = (dt6 * A6).clamp(min=MIN_LOG_DECAY)  # (b, g, r, n, k, c), <= 0
    cum = log_decay.cumsum(-1)  # in [SCAN_CHUNK * MIN_LOG_DECAY, 0]
    growth = cum.exp()
    drive = (dt * u32_padded).view(batch, groups, per_group, 1, chunks, chunk) * B6  # (b, g, r, n, k, c)
    local = growth * (drive * (-cum).exp()).cumsum(-1)  # state from this chunk's inputs alone
    state = (initial_state.float().view(batch, groups, per_group, n) if initial_state is not None
             else u32.new_zeros(batch, groups, per_group, n))
    entering = []
    # unbind (not indexing in the loop): its backward is one stack, not a zero-filled full tensor a chunk
    for decay, last in zip(growth[..., -1].unbind(-1), local[..., -1].unbind(-1)):  # (b, g, r, n) each
        entering.append(state)
        state = decay * state + last
    h = local + growth * torch.stack(entering, dim=-1)[..., None]  # (b, g, r, n, k, c)
    y = (h * C6).sum(3).reshape(batch, channels, -1)[..., :length]  # (b, d, l)
    y = (y + D.float()[:, None] * u32) * F.silu(z.float())
    return y.to(out_dtype), state.reshape(batch, channels, n)


# --- selective state update (decode) -------------------------------------------------------------

def selective_state_step(
    state: torch.Tensor,  # (b, d, n) fp32, updated in place
    x: torch.Tensor,  # (b, d)
    delta: torch.Tensor,  # (b, d) before bias and softplus
    A: torch.Tensor,  # (d, n)
    B: torch.Tensor,  # (b, g, n)
    C: torch.Tensor,  # (b, g, n)
    D: torch.Tensor,  # (d,)
    z: torch.Tensor,  # (b, d)
    delta_bias: torch.Tensor,  # (d,)
) -> torch.Tensor:
    """One token of the recurrence; returns y (b, d) and advances `state` in place."""
    functions = _use_cuda("selective_state_update", x, _mamba_ssm)
    batch, channels = x.shape
    groups, n = B.shape[1], B.shape[2]
    if functions is not None:
        _announce("selective_state_update", "mamba_ssm selective_state_update (Triton)")
        selective_state_update = functions[1]
        # Grouped Mamba-1 as the multi-head form: group = "head" of channels/groups channels sharing B, C.
        per = channels // groups
        y = selective_state_update(
            state.view(batch, groups, per, n),
            x.view(batch, groups, per),
            delta.view(batch, groups, per),
            A.view(groups, per, n),
            B,
            C,
            D=D.view(groups, per),
            z=z.view(batch, groups, per),
            dt_bias=delta_bias.view(groups, per),
            dt_softplus=True,
        )
        return y.view(batch, channels)
    _announce("selective_state_update", "PyTorch reference")
    dt = F.softplus(delta.float() + delta_bias.float())  # (b, d)
    reps = channels // groups
    B_channel = B.float().repeat_interleave(reps, dim=1)  # (b, d, n)
    C_channel = C.float().repeat_interleave(reps, dim=1)
    new_state = torch.exp(dt[..., None] * A.float()) * state + dt[..., None] * B_channel * x.float()[..., None]
    state.copy_(new_state)
    y = (new_state * C_channel).sum(-1) + D.float() * x.float()
    return (y * F.silu(z.float())).to(x.dtype)


# --- the Mamba mixer's decode token -------------------------------------------------------------

def mamba_decode_step(
    proj: torch.Tensor,  # (b, >= 2 d + 2 d_xb) in_proj(h) as [z | x | B | C] (more columns may follow)
    dt: torch.Tensor,  # (b, d) dt_proj(dt_in_proj(h)) before bias and softplus
    index: torch.Tensor,  # (d,) GQA expansion: expanded channel -> source channel of x and B
    d_xb: int,
    conv_state: torch.Tensor,  # (b, d, k) updated in place
    conv_weight: torch.Tensor,  # (d, k)
    conv_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,  # (b, d, n) fp32, updated in place
    A: torch.Tensor,  # (d, n) fp32 = -exp(A_log)
    A_log: torch.Tensor,  # (d, n) fp32
    D: torch.Tensor,  # (d,)
    dt_bias: torch.Tensor,  # (d,)
    token_mask: torch.Tensor | None = None,  # (b,) 0 where this token is padding
) -> torch.Tensor:
    """One token of the Mamba-in-Llama mixer after its projections; returns y (b, d), advances both states.

    The one decode step every caller runs (`MambaMixer.step`, and through it the engine's decode and
    `generate()`). On CUDA with a 16-bit model and no padding mask: one Triton kernel
    (`pipeline.model.triton_step`). Elsewhere: `causal_conv_step` then `selective_state_step` (CUDA
    kernels where installed, else PyTorch).
    """
    from pipeline.model import triton_step

    batch, d_inner = dt.shape
    groups, n = d_inner // ssm_state.shape[-1], ssm_state.shape[-1]
    if proj.shape[-1] < 2 * d_inner + 2 * d_xb:
        raise ValueError(f"proj has {proj.shape[-1]} columns, fewer than 2 d_inner + 2 d_xb = {2 * d_inner + 2 * d_xb}")
    if (token_mask is None and kernel_mode() != "reference" and proj.dtype in (torch.float16, torch.bfloat16)
            and conv_state.dtype == proj.dtype and n & (n - 1) == 0 and triton_step.available(proj.device)
            and (proj.is_cuda or kernel_mode() == "auto")):
        _announce("mamba_decode_step", "fused Triton kernel")
        return triton_step.mamba_step(proj, dt, index, d_xb, conv_state, conv_weight, conv_bias, ssm_state,
                                      A_log, D, dt_bias)
    _announce("mamba_decode_step", "conv step + selective state step")
    z, x, B, C = proj[:, : 2 * d_inner + 2 * d_xb].split([d_inner, d_xb, d_xb, d_inner], dim=-1)
    x = x.index_select(-1, index)  # (b, d)
    B = B.index_select(-1, index).view(batch, groups, n)
    C = C.reshape(batch, groups, n)
    if token_mask is not None:
        x = x * token_mask[:, None].to(x.dtype)
    u = causal_conv_step(x, conv_state, conv_weight, conv_bias)  # (b, d)
    if token_mask is not None:
        u = u * token_mask[:, None].to(u.dtype)
    return selective_state_step(ssm_state, u, dt, A, B, C, D, z, dt_bias)


# --- causal depthwise conv -----------------------------------------------------------------------

def causal_conv(
    x: torch.Tensor,  # (b, d, l)
    weight: torch.Tensor,  # (d, k)
    bias: torch.Tensor | None,  # (d,)
    context: torch.Tensor | None = None,  # (b, d, k) inputs before x (from the cache), or None = zeros
) -> torch.Tensor:
    """silu(depthwise causal conv); returns (b, d, l)."""
    width = weight.shape[-1]
    if context is None:
        functions = _use_cuda("causal_conv1d", x, _causal_conv1d)
        if functions is not None:
            _announce("causal_conv1d", "causal_conv1d_fn (CUDA)")
            return functions[0](x, weight, bias, activation="silu")
        padded = F.pad(x, (width - 1, 0))
    else:
        padded = torch.cat([context[..., -(width - 1):].to(x.dtype), x], dim=-1) if width > 1 else x
    _announce("causal_conv1d", "PyTorch conv1d")
    out = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   groups=x.shape[1])
    return F.silu(out)


def causal_conv_step(
    x: torch.Tensor,  # (b, d) the new input
    conv_state: torch.Tensor,  # (b, d, k) the last k inputs, updated in place (oldest first)
    weight: torch.Tensor,  # (d, k)
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One token of the causal conv; returns silu(conv) (b, d) and shifts `x` into `conv_state`."""
    functions = _use_cuda("causal_conv1d_update", x, _causal_conv1d)
    if functions is not None and conv_state.dtype == x.dtype:
        _announce("causal_conv1d_update", "causal_conv1d_update (CUDA)")
        return functions[1](x, conv_state, weight, bias, activation="silu")
    _announce("causal_conv1d_update", "PyTorch reference")
    window = torch.cat([conv_state[..., 1:], x.to(conv_state.dtype)[..., None]], dim=-1)
    conv_state.copy_(window)
    out = (window.float() * weight.float()).sum(-1)  # in fp32, rounded once at the end (as the CUDA kernels)
    if bias is not None:
        out = out + bias.float()
    return F.silu(out).to(x.dtype)


# --- gated delta rule (Gated DeltaNet) ------------------------------------------------------------
#
# Per head, with the state S of shape (e, e_v) (the key dim first, as fla-core stores it):
#     S_t = exp(g_t) S_(t-1) + k_t w_t^T,   w_t = beta_t (v_t - exp(g_t) S_(t-1)^T k_t),   o_t = scale S_t^T q_t
# q and k are L2-normalised per head first (x / sqrt(|x|^2 + 1e-6), fla-core's in-kernel normalisation);
# g <= 0 is the log decay, beta in [0, 1] the write strength; scale is usually e^-0.5.

QK_NORM_EPS = 1e-6
DELTA_CHUNK = 32  # tokens a chunk of the reference (fla-core uses 64; any size gives the same result)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim, in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + QK_NORM_EPS)


def gated_delta_rule(
    q: torch.Tensor,  # (b, l, h, e) before L2 normalisation
    k: torch.Tensor,  # (b, l, h, e) before L2 normalisation
    v: torch.Tensor,  # (b, l, h, e_v)
    g: torch.Tensor,  # (b, l, h) fp32 log decay, <= 0
    beta: torch.Tensor,  # (b, l, h) in [0, 1]
    scale: float,
    initial_state: torch.Tensor | None = None,  # (b, h, e, e_v) fp32
    return_last_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over a sequence; returns (o (b, l, h, e_v) in v's dtype, S_l (b, h, e, e_v) fp32 or None).

    CUDA: fla-core's `chunk_gated_delta_rule` (forward and backward, an initial state and the last state
    included); elsewhere the chunked PyTorch reference.
    """
    functions = _use_cuda("gated_delta_rule", q, _fla)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
    if functions is not None and training and not fla_backward_is_correct(q.device):
        _announce("gated_delta_rule", "PyTorch chunked reference for training: fla-core's chunk backward is wrong "
                  "on Hopper with Triton >= 3.4, < 3.7.1 (fla-core refuses it); forward-only calls still use it")
        functions = None
    elif functions is not None:
        _announce("gated_delta_rule", "fla-core chunk_gated_delta_rule (Triton)")
        o, last = functions[0](
            q, k, v, g.float(), beta.to(q.dtype), scale=scale,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=return_last_state, use_qk_l2norm_in_kernel=True,
        )
        return o.to(v.dtype), last
    _announce("gated_delta_rule", "PyTorch chunked reference")
    o, last = gated_delta_rule_reference(q, k, v, g, beta, scale, initial_state)
    return o, (last if return_last_state else None)


def fla_backward_is_correct(device: torch.device, triton_version: str | None = None) -> bool:
    """Whether fla-core's chunked gated-delta backward is right on `device`: not on Hopper (compute
    capability 9.x) with Triton >= 3.4.0 and < 3.7.1, where fla-core itself refuses it (its issue #640:
    wrong results in chunk_bwd_dqkwg); the training path then takes the PyTorch reference."""
    if device.type != "cuda":
        return True
    if triton_version is None:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            return True
    parts = tuple(int(part) for part in re.findall(r"\d+", triton_version)[:3])
    parts = parts + (0,) * (3 - len(parts))
    return not (torch.cuda.get_device_capability(device)[0] == 9 and (3, 4, 0) <= parts < (3, 7, 1))


def gated_delta_rule_reference(q, k, v, g, beta, scale: float, initial_state=None, chunk: int = DELTA_CHUNK):
    """Chunked gated delta rule in fp32, vectorised inside chunks, a loop over chunks (not tokens).

    Inside a chunk, with G_t the cumulative log decay from the chunk's start, D[t, s] = exp(G_t - G_s) for
    s <= t, and S_0 the entering state, the writes w_t solve the unit lower-triangular system
    (I + diag(beta) (D o K K^T)_strict) W = diag(beta) (V - diag(exp G) K S_0), i.e. W = U - Wk S_0 with
    U = T diag(beta) V and Wk = T diag(beta exp G) K (T the system's inverse, the same for every S_0: all
    chunks at once). Then, chunk by chunk: O = scale (diag(exp G) Q S_0 + (D o Q K^T) W) and
    S_next = exp(G_last) S_0 + (K o exp(G_last - G))^T W. No exponent is positive, so nothing overflows.
    """
    batch, length, heads, _ = q.shape
    out_dtype = v.dtype
    q = l2_normalise(q).transpose(1, 2) * scale  # (b, h, l, e)
    k = l2_normalise(k).transpose(1, 2)
    v = v.float().transpose(1, 2)  # (b, h, l, e_v)
    g = g.float().transpose(1, 2)  # (b, h, l)
    beta = beta.float().transpose(1, 2)
    pad = (-length) % chunk  # padded tokens: decay 1, no write, so the state passes through unchanged
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (length + pad) // chunk
    q, k, v = (x.reshape(batch, heads, n, chunk, x.shape[-1]) for x in (q, k, v))  # (b, h, n, c, e)
    g, beta = g.reshape(batch, heads, n, chunk), beta.reshape(batch, heads, n, chunk)
    cum = g.cumsum(-1)  # (b, h, n, c), <= 0 and falling
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # s <= t
    exponent = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = exponent.exp()  # D: (b, h, n, c, c), zero above the diagonal
    strict = (k @ k.transpose(-1, -2)) * decay * beta[..., :, None]
    system = torch.eye(chunk, device=q.device) + strict.tril(-1)  # unit lower-triangular
    U = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    Wk = torch.linalg.solve_triangular(system, (beta * cum.exp())[..., None] * k, upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay  # (b, h, n, c, c)
    entry = cum.exp()[..., None]  # (b, h, n, c, 1): decay from the chunk's start
    tail = (cum[..., -1:] - cum).exp()[..., None]  # (b, h, n, c, 1): decay to the chunk's end
    state = (initial_state.float() if initial_state is not None
             else q.new_zeros(batch, heads, q.shape[-1], v.shape[-1]))
    outputs = []
    # unbind (not indexing in the loop): its backward is one stack, not a zero-filled full tensor a chunk
    for parts in zip(*(x.unbind(2) for x in (q, k, U, Wk, scores, entry, tail, cum[..., -1:]))):
        qc, kc, Uc, Wkc, scores_c, entry_c, tail_c, last_c = parts
        writes = Uc - Wkc @ state  # (b, h, c, e_v)
        outputs.append(entry_c * (qc @ state) + scores_c @ writes)
        state = last_c.exp()[..., None] * state + (kc * tail_c).transpose(-1, -2) @ writes
    o = torch.stack(outputs, dim=2).reshape(batch, heads, n * chunk, -1)[:, :, :length]
    return o.transpose(1, 2).to(out_dtype), state


def gated_delta_rule_step(
    state: torch.Tensor,  # (b, h, e, e_v) fp32, updated in place
    q: torch.Tensor,  # (b, h, e) before L2 normalisation
    k: torch.Tensor,  # (b, h, e)
    v: torch.Tensor,  # (b, h, e_v)
    g: torch.Tensor,  # (b, h) fp32 log decay
    beta: torch.Tensor,  # (b, h)
    scale: float,
) -> torch.Tensor:
    """One token of the gated delta rule; returns o (b, h, e_v) in v's dtype and advances `state` in place.

    CUDA: fla-core's `fused_recurrent_gated_delta_rule` (one Triton kernel; its new state is copied back into
    `state`, so the step keeps static addresses for a CUDA graph); elsewhere PyTorch. No host syncs either way.
    """
    functions = _use_cuda("gated_delta_rule_step", q, _fla)
    if functions is not None:
        _announce("gated_delta_rule_step", "fla-core fused_recurrent_gated_delta_rule (Triton)")
        o, last = functions[1](
            q[:, None], k[:, None], v[:, None], g=g.float()[:, None], beta=beta.to(q.dtype)[:, None], scale=scale,
            initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True,
        )
        state.copy_(last)
        return o[:, 0].to(v.dtype)
    _announce("gated_delta_rule_step", "PyTorch reference")
    q, k = l2_normalise(q) * scale, l2_normalise(k)
    state.mul_(g.float().exp()[..., None, None])
    writes = beta.float()[..., None] * (v.float() - torch.einsum("bhkv,bhk->bhv", state, k))
    state.add_(k[..., :, None] * writes[..., None, :])
    return torch.einsum("bhkv,bhk->bhv", state, q).to(v.dtype)


# --- attention -----------------------------------------------------------------------------------

def attention(
    q: torch.Tensor,  # (b, h, t, e)
    k: torch.Tensor,  # (b, h_kv, s, e)
    v: torch.Tensor,  # (b, h_kv, s, e)
    mask: torch.Tensor | None,  # (b, 1, t, s) bool, True = may attend; None = plain causal
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Grouped-query attention; returns (b, h, t, e). flash-attn for unpadded causal fp16/bf16 on CUDA."""
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plain_causal = mask is None and q.shape[2] == k.shape[2]
    if plain_causal and q.dtype in (torch.float16, torch.bfloat16):
        flash = _use_cuda("attention", q, _flash_attn, required_by_mode=False)
        if flash is not None:
            _announce("attention", "flash_attn_func (CUDA)")
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                        softmax_scale=scale, causal=True)
            return out.transpose(1, 2)
    _announce("attention", f"torch SDPA ({q.device.type})")
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if mask is None and q.shape[2] != k.shape[2]:
        raise ValueError("attention over a cache needs an explicit mask")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale
    )


__all__ = [
    "KERNEL_MODES",
    "KernelUnavailableError",
    "attention",
    "causal_conv",
    "causal_conv_step",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_rule_step",
    "kernel_mode",
    "l2_normalise",
    "mamba_decode_step",
    "paths_used",
    "selective_scan",
    "selective_scan_reference",
    "selective_state_step",
    "set_kernel_mode",
    "use_kernels",
]
