"""Test oracles: the per-token recurrences (the definitions themselves) that the kernels of
pipeline.model.kernels are checked against."""

import torch
import torch.nn.functional as F

from pipeline.model.kernels import l2_normalise


def selective_scan_naive(u, delta, A, B, C, D, z, delta_bias, initial_state=None):
    """Mamba-1's selective scan as the per-token recurrence, the definition itself."""
    batch, channels, length = u.shape
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])
    reps = channels // B.shape[1]
    state = initial_state.float().clone() if initial_state is not None else u.new_zeros(
        batch, channels, A.shape[1], dtype=torch.float32
    )
    ys = []
    for t in range(length):
        Bt = B[..., t].float().repeat_interleave(reps, dim=1)  # (b, d, n)
        Ct = C[..., t].float().repeat_interleave(reps, dim=1)
        state = torch.exp(dt[..., t, None] * A.float()) * state + dt[..., t, None] * Bt * u[..., t, None].float()
        ys.append((state * Ct).sum(-1) + D.float() * u[..., t].float())
    y = torch.stack(ys, dim=-1) * F.silu(z.float())
    return y.to(u.dtype), state


def gated_delta_rule_naive(q, k, v, g, beta, scale: float, initial_state=None):
    """The gated delta rule as the per-token recurrence, the definition itself."""
    batch, length, heads, _ = q.shape
    q, k = l2_normalise(q) * scale, l2_normalise(k)
    state = (initial_state.float().clone() if initial_state is not None
             else q.new_zeros(batch, heads, q.shape[-1], v.shape[-1]))
    outputs = []
    for t in range(length):
        state = g[:, t, :, None, None].float().exp() * state
        writes = beta[:, t, :, None].float() * (v[:, t].float() - torch.einsum("bhkv,bhk->bhv", state, k[:, t]))
        state = state + k[:, t, :, :, None] * writes[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1).to(v.dtype), state
