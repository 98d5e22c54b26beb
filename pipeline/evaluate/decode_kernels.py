"""Triton kernels for the engine's decode step (one new token per sequence): the memory-bound pieces.

- `DecodeAttention`: split-K ("flash-decoding") GQA attention of one query token over a static K/V
  cache. Each program owns one (sequence, KV head) and a slice of the cache: it reads that slice of K and
  V once, with the softmax fused (online, in fp32, base 2), for all h / h_kv query heads that share the KV
  head; a second small kernel merges the slices by their log-sum-exp. Only columns up to the current one
  (read from device memory, so a CUDA graph can replay it as the cache grows) are read.
- `rope_kv_write`: rotary embedding of q and k straight out of the fused QKV projection, q written to
  its own buffer, k and v written into the cache column of this step.
- `add_rms_norm`: residual add + RMSNorm in one pass (the residual stream is updated in place), with
  transformers' LlamaRMSNorm rounding order: normalise in fp32, round to the model dtype, then scale.
- `silu_mul`: the gated MLP's act(gate) * up.
(The Mamba mixer's decode token is one kernel too, `pipeline.model.triton_step`: it belongs to the
model's own step, `MambaMixer.step`, which the engine calls like every other caller.)

Triton is imported lazily: `available()` is False without it (CPU machines, CI), and the engine falls
back to plain PyTorch ops there. `TRITON_INTERPRET=1` runs these kernels on CPU tensors for debugging.
Shapes: b batch, h query heads, g = h_kv KV heads, r = h / g query heads per KV head, L cache length,
e head dim, H hidden size, S cache splits.
"""

from __future__ import annotations

import functools
import math

import torch

from pipeline.model.triton_step import available, triton_modules  # one lazy Triton import for both

LOG2E = 1.4426950408889634
BLOCK_N = 128  # cache columns per inner iteration of the attention kernel (benchmarks/decode_attention.py)


@functools.cache
def _kernels():
    triton, tl = triton_modules()

    @triton.jit
    def attention_split(
        Q, K, V, VALID, SLOT, PART_O, PART_ML,
        scale_log2, kv_heads, n_splits, split_len,
        stride_qb, stride_qg,
        stride_kb, stride_kg, stride_kl,
        stride_vb, stride_vg, stride_vl,
        stride_valid,
        R: tl.constexpr, R_PAD: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr,
    ):
        split = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // kv_heads).to(tl.int64)  # 64-bit offsets: a large batch's cache exceeds 2^31 elements
        g = bg % kv_heads
        length = tl.load(SLOT) + 1  # columns 0 .. slot hold keys (the slot was written this step)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, length)
        rows = tl.arange(0, R_PAD)
        dims = tl.arange(0, E)
        q = tl.load(Q + b * stride_qb + g * stride_qg + rows[:, None] * E + dims[None, :],
                    mask=rows[:, None] < R, other=0.0)
        m = tl.full([R_PAD], -1.0e30, tl.float32)  # running max (log2 units); finite, so empty slices give 0
        l = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, E], tl.float32)
        k_base = K + b * stride_kb + g * stride_kg
        v_base = V + b * stride_vb + g * stride_vg
        for start in range(lo, hi, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < hi
            valid = tl.load(VALID + b * stride_valid + cols, mask=inside, other=0) != 0
            k = tl.load(k_base + cols[:, None] * stride_kl + dims[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # (R_PAD, BLOCK) fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vl + dims[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        part = (bg * n_splits + split) * R + rows  # (R_PAD,) row index into the partials
        keep = rows < R
        tl.store(PART_O + part[:, None] * E + dims[None, :], acc, mask=keep[:, None])
        tl.store(PART_ML + part * 2, m, mask=keep)
        tl.store(PART_ML + part * 2 + 1, l, mask=keep)

    @triton.jit
    def attention_merge(PART_O, PART_ML, OUT, n_splits,
                        R: tl.constexpr, E: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)  # (sequence, KV head, query row) = one query head of one sequence
        bg = row // R
        r = row % R
        splits = tl.arange(0, BLOCK_S)
        ok = splits < n_splits
        part = (bg * n_splits + splits) * R + r
        m = tl.load(PART_ML + part * 2, mask=ok, other=-1.0e30)
        l = tl.load(PART_ML + part * 2 + 1, mask=ok, other=0.0)
        top = tl.max(m, 0)
        w = tl.where(ok, tl.exp2(m - top), 0.0)
        dims = tl.arange(0, E)
        o = tl.load(PART_O + part[:, None] * E + dims[None, :], mask=ok[:, None], other=0.0)
        total = tl.sum(w * l, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(OUT + row * E + dims, out.to(OUT.dtype.element_ty))

    @triton.jit
    def rope_kv_write(
        QKV, COS, SIN, Q_OUT, K_CACHE, V_CACHE, SLOT,
        heads, kv_heads,
        stride_qkv, stride_cos, stride_sin,
        stride_kb, stride_kg, stride_kl,
        stride_vb, stride_vg, stride_vl,
        HALF: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)  # 0 .. heads-1: query heads; heads .. heads+kv_heads-1: KV heads
        half = tl.arange(0, HALF)
        cos = tl.load(COS + b * stride_cos + half).to(tl.float32)  # cos/sin repeat their first half
        sin = tl.load(SIN + b * stride_sin + half).to(tl.float32)
        row = QKV + b * stride_qkv + j * (2 * HALF)
        x1 = tl.load(row + half).to(tl.float32)
        x2 = tl.load(row + HALF + half).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        if j < heads:
            out = Q_OUT + (b * heads + j) * (2 * HALF)
            tl.store(out + half, y1.to(Q_OUT.dtype.element_ty))
            tl.store(out + HALF + half, y2.to(Q_OUT.dtype.element_ty))
        else:
            g = j - heads
            slot = tl.load(SLOT)
            k_out = K_CACHE + b * stride_kb + g * stride_kg + slot * stride_kl
            tl.store(k_out + half, y1.to(K_CACHE.dtype.element_ty))
            tl.store(k_out + HALF + half, y2.to(K_CACHE.dtype.element_ty))
            dims = tl.arange(0, 2 * HALF)
            v = tl.load(QKV + b * stride_qkv + (heads + kv_heads + g) * (2 * HALF) + dims)
            tl.store(V_CACHE + b * stride_vb + g * stride_vg + slot * stride_vl + dims, v.to(V_CACHE.dtype.element_ty))

    @triton.jit
    def add_rms_norm(X, UPDATE, W, NORMED, width, eps,
                     HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        x = tl.load(X + row * width + cols, mask=ok, other=0.0)
        if HAS_UPDATE:
            u = tl.load(UPDATE + row * width + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + u.to(tl.float32)).to(X.dtype.element_ty)  # as torch's add rounds
            tl.debug_barrier()  # in place: all reads of the row before any write (as in pipeline.model.triton_step)
            tl.store(X + row * width + cols, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / width + eps)
        normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(NORMED + row * width + cols, (normed * w).to(NORMED.dtype.element_ty), mask=ok)

    @triton.jit
    def silu_mul(GATE_UP, OUT, width, stride_in, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        gate = tl.load(GATE_UP + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + row * stride_in + width + cols, mask=ok, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)  # silu rounds first
        tl.store(OUT + row * width + cols, (act * up).to(OUT.dtype.element_ty), mask=ok)

    return dict(attention_split=attention_split, attention_merge=attention_merge, rope_kv_write=rope_kv_write,
                add_rms_norm=add_rms_norm, silu_mul=silu_mul)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class DecodeAttention:
    """Split-K decode attention over static caches of one engine: partial buffers allocated once.

    q (b, g, r, e) after RoPE; keys / values (b, g, L, e); key_valid (b, L) bool; slot (1,) long, the
    column written this step. Returns (b, g, r, e) in q's dtype (a static buffer).
    """

    def __init__(self, batch: int, kv_heads: int, rows: int, head_dim: int, max_length: int,
                 device: torch.device, dtype: torch.dtype, n_splits: int | None = None, *,
                 block_n: int = BLOCK_N, num_warps: int = 4, num_stages: int = 2) -> None:
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f"decode attention needs a power-of-two head_dim >= 16, got {head_dim}")
        self.rows, self.head_dim = rows, head_dim
        self.block_n, self.num_warps, self.num_stages = block_n, num_warps, num_stages
        blocks = math.ceil(max_length / block_n)
        if n_splits is None:
            # Enough programs to keep every SM busy several times over, so the last wave is short.
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
            n_splits = math.ceil(8 * sms / (batch * kv_heads))
        n_splits = max(1, min(n_splits, blocks))
        self.split_len = math.ceil(blocks / n_splits) * block_n
        self.n_splits = math.ceil(max_length / self.split_len)
        part_rows = batch * kv_heads * self.n_splits * rows
        self.part_o = torch.empty(part_rows, head_dim, dtype=torch.float32, device=device)
        self.part_ml = torch.empty(part_rows, 2, dtype=torch.float32, device=device)
        self.out = torch.empty(batch, kv_heads, rows, head_dim, dtype=dtype, device=device)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_valid: torch.Tensor,
                 slot: torch.Tensor, scale: float) -> torch.Tensor:
        kernels = _kernels()
        b, g, r, e = q.shape
        assert q.is_contiguous() and keys.stride(-1) == 1 and values.stride(-1) == 1 and key_valid.is_contiguous()
        valid = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
        kernels["attention_split"][(self.n_splits, b * g)](
            q, keys, values, valid, slot, self.part_o, self.part_ml,
            scale * LOG2E, g, self.n_splits, self.split_len,
            q.stride(0), q.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            valid.stride(0),
            R=r, R_PAD=max(16, _next_pow2(r)), E=e, BLOCK=self.block_n, num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        kernels["attention_merge"][(b * g * r,)](
            self.part_o, self.part_ml, self.out, self.n_splits,
            R=r, E=e, BLOCK_S=max(2, _next_pow2(self.n_splits)), num_warps=4,
        )
        return self.out


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, heads: int, kv_heads: int) -> None:
    """qkv (b, (h + 2 g) e) -> q_out (b, h, e) rotated; rotated k and v into keys / values[:, :, slot]."""
    b = qkv.shape[0]
    e = q_out.shape[-1]
    assert qkv.stride(-1) == 1 and cos.shape[-1] == e and q_out.is_contiguous()
    cos, sin = cos.reshape(b, e), sin.reshape(b, e)
    _kernels()["rope_kv_write"][(b, heads + kv_heads)](
        qkv, cos, sin, q_out, keys, values, slot, heads, kv_heads,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        HALF=e // 2, num_warps=1,
    )


def add_rms_norm(hidden: torch.Tensor, update: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 normed: torch.Tensor) -> None:
    """hidden += update (in place, when given); normed = RMSNorm(hidden) * weight. Rows of width H."""
    width = hidden.shape[-1]
    assert hidden.is_contiguous() and normed.is_contiguous() and (update is None or update.is_contiguous())
    block = _next_pow2(width)
    _kernels()["add_rms_norm"][(hidden.numel() // width,)](
        hidden, update if update is not None else hidden, weight, normed, width, eps,
        HAS_UPDATE=update is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """gate_up (b, 2 I) = [gate | up] -> out (b, I) = silu(gate) * up."""
    width = out.shape[-1]
    block = 1024
    _kernels()["silu_mul"][(gate_up.shape[0], math.ceil(width / block))](
        gate_up, out, width, gate_up.stride(0), BLOCK=block, num_warps=4,
    )
    return out


__all__ = ["DecodeAttention", "add_rms_norm", "available", "rope_kv_write", "silu_mul"]
