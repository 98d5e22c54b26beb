"""The Mamba mixer's decode token in one Triton kernel (CUDA, 16-bit models): what `MambaMixer.step`
runs there, through `kernels.mamba_decode_step`.

From the mixer's input projections (z | x | B | C of in_proj, and dt before its bias) it does the conv
window shift, silu(conv), softplus(dt), the selective state update with the GQA expansion of x and B read
through an index (nothing expanded in memory), the C readout, the D skip and the silu(z) gate, reading and
writing each state once. The composed path (`causal_conv_step` + `selective_state_step`) computes the same
and is what it is tested against.

Triton is imported lazily: `available()` is False without it (CPU machines, CI). `TRITON_INTERPRET=1` runs
the kernel on CPU tensors for debugging.
"""

from __future__ import annotations

import functools
import math
import os

import torch


@functools.cache
def triton_modules():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def available(device: torch.device) -> bool:
    """True where the kernel can run on `device`: triton imports and the device is CUDA (or the interpreter
    is on)."""
    if triton_modules() is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel():
    triton, tl = triton_modules()

    @triton.jit
    def mamba_step(
        PROJ, DT, INDEX, CONV, CONV_W, CONV_B, SSM, A_LOG, D, DT_BIAS, OUT,
        d_inner, d_xb,
        stride_proj, stride_dt, stride_conv_b, stride_conv_d, stride_ssm_b, stride_ssm_d, stride_out,
        K: tl.constexpr, K_PAD: tl.constexpr, N: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # channels of d_inner
        ok = c < d_inner
        row = PROJ + b * stride_proj  # [z (d_inner) | x (d_xb) | B (d_xb) | C (d_inner)]
        # x: the expanded channel c reads source channel INDEX[c] of the d_xb-wide projection
        source = tl.load(INDEX + c, mask=ok, other=0)
        x = tl.load(row + d_inner + source, mask=ok, other=0.0)
        # conv window (oldest first): shift left by one, the new input last; silu(conv + bias)
        taps = tl.arange(0, K_PAD)
        window_ptr = CONV + b * stride_conv_b + c[:, None] * stride_conv_d + taps[None, :]
        shifted = tl.load(window_ptr + 1, mask=ok[:, None] & (taps[None, :] + 1 < K), other=0.0)
        window = tl.where(taps[None, :] == K - 1, x[:, None], shifted)
        weight = tl.load(CONV_W + c[:, None] * K + taps[None, :], mask=ok[:, None] & (taps[None, :] < K), other=0.0)
        u = tl.sum(window.to(tl.float32) * weight.to(tl.float32), 1)
        if HAS_CONV_BIAS:
            u += tl.load(CONV_B + c, mask=ok, other=0.0).to(tl.float32)
        u = (u / (1.0 + tl.exp(-u))).to(x.dtype).to(tl.float32)  # rounded as the conv kernel's output is
        # dt = softplus(dt + bias) (linear above 20, as torch and mamba_ssm do)
        dt = tl.load(DT + b * stride_dt + c, mask=ok, other=0.0).to(tl.float32)
        dt += tl.load(DT_BIAS + c, mask=ok, other=0.0).to(tl.float32)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        # B and C of channel c: group c // N of the expanded B (read through INDEX) and of C
        states = tl.arange(0, N)
        member = (c // N)[:, None] * N + states[None, :]  # (BLOCK_D, N) expanded positions
        b_source = tl.load(INDEX + member, mask=ok[:, None], other=0)
        B = tl.load(row + d_inner + d_xb + b_source, mask=ok[:, None], other=0.0).to(tl.float32)
        C = tl.load(row + d_inner + 2 * d_xb + member, mask=ok[:, None], other=0.0).to(tl.float32)
        A = -tl.exp(tl.load(A_LOG + c[:, None] * N + states[None, :], mask=ok[:, None], other=0.0))
        state_ptr = SSM + b * stride_ssm_b + c[:, None] * stride_ssm_d + states[None, :]
        state = tl.load(state_ptr, mask=ok[:, None], other=0.0)
        state = state * tl.exp(A * dt[:, None]) + B * (dt * u)[:, None]
        y = tl.sum(state * C, 1) + tl.load(D + c, mask=ok, other=0.0) * u
        z = tl.load(row + c, mask=ok, other=0.0).to(tl.float32)
        y = y * (z / (1.0 + tl.exp(-z)))
        # The window and the state are rewritten in place: every thread's reads must be done before any
        # thread writes (a layout may give one element to several threads, which then race otherwise).
        tl.debug_barrier()
        tl.store(window_ptr, window, mask=ok[:, None] & (taps[None, :] < K))
        tl.store(state_ptr, state, mask=ok[:, None])
        tl.store(OUT + b * stride_out + c, y.to(OUT.dtype.element_ty), mask=ok)

    return mamba_step


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def mamba_step(proj: torch.Tensor, dt: torch.Tensor, index: torch.Tensor, d_xb: int, conv_state: torch.Tensor,
               conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, ssm_state: torch.Tensor,
               A_log: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """One decode token; returns y (b, d) and advances `conv_state` and `ssm_state` in place.

    proj (b, >= 2 d + 2 d_xb): in_proj(h) as [z | x | B | C] in its first 2 d + 2 d_xb columns (a caller's
    fused GEMM may have more columns after them: d_xb is given, never inferred from the width);
    dt (b, d) = dt_proj(dt_in_proj(h)) before bias; index (d,) the GQA expansion (expanded channel ->
    source channel of x / B); conv_state (b, d, k) in the model dtype and ssm_state (b, d, n) fp32;
    conv_weight (d, k); A_log, D fp32.
    """
    batch, d_inner = dt.shape
    n, k = ssm_state.shape[-1], conv_state.shape[-1]
    if proj.shape[-1] < 2 * d_inner + 2 * d_xb:
        raise ValueError(f"proj has {proj.shape[-1]} columns, fewer than 2 d_inner + 2 d_xb = {2 * d_inner + 2 * d_xb}")
    assert proj.stride(-1) == 1 and dt.stride(-1) == 1 and conv_state.stride(-1) == 1 and ssm_state.stride(-1) == 1
    assert conv_weight.is_contiguous() and A_log.is_contiguous() and n & (n - 1) == 0
    out = torch.empty(batch, d_inner, dtype=proj.dtype, device=proj.device)
    block = 64
    _kernel()[(batch, math.ceil(d_inner / block))](
        proj, dt, index, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, ssm_state,
        A_log, D, dt_bias, out, d_inner, d_xb,
        proj.stride(0), dt.stride(0), conv_state.stride(0), conv_state.stride(1), ssm_state.stride(0),
        ssm_state.stride(1), out.stride(0),
        K=k, K_PAD=_next_pow2(k), N=n, HAS_CONV_BIAS=conv_bias is not None, BLOCK_D=block, num_warps=4,
    )
    return out


__all__ = ["available", "mamba_step", "triton_modules"]
