"""Distillation (reverse / forward KL) and cross-entropy losses, chunked over tokens through the lm_head.

Notation: N = trained tokens (rows kept by the mask), C = tokens in one chunk, H = hidden size,
V = vocabulary size, T = temperature.

The losses take final hidden states and lm_head weights rather than logits, so that the (N, V) logits of
the student and of the teacher never exist at once: at most about three (C, V) fp32 blocks do.
A chunk holds C = min(chunk_tokens, chunk_elements // V) rows, so its blocks have a fixed number of
elements whatever the vocabulary: the peak memory above the inputs and the gradients does not grow with V.
`_ChunkedHeadLoss` walks the tokens C at a time; for each chunk it builds both (C, V) logit blocks, the
per-token loss and, when a gradient is wanted, the gradient of the loss w.r.t. the student logits, which
it immediately folds into the gradients w.r.t. the student hidden states (N, H) and head weight (V, H).
Those two gradients are all the backward keeps, so backward holds no logits either: it scales them in
place by the incoming gradient (the loss is a scalar) and hands them over, so a graph through this loss
is backpropagated once (no `retain_graph` second pass).
The head-weight gradient is accumulated in the weight's own dtype, chunk after chunk (as gradient
accumulation over micro-batches does): exact fp32 sums for fp32 master weights (autocast training), one
bf16 rounding per chunk for a bf16 head. When the compute dtype differs from the weight's, each chunk's
product is added in vocabulary slices of at most chunk_elements elements, so no (V, H) temporary exists;
the one (V, H)-sized extra is then the head cast to the compute dtype, a copy of an input.

Conventions:
- reverse KL = KL(student || teacher) = sum_v p_s (log p_s - log p_t), the Apriel-H1 default;
  forward KL = KL(teacher || student); both between the tempered softmaxes softmax(logits / T), with no
  T^2 factor (the value is the KL itself, which MMR compares across layers).
- The teacher is a constant: its inputs are detached and receive no gradient.
- `mask` marks rows to train; the result is the mean over marked rows (`reduction="mean"`, 0 when none)
  or their sum (`reduction="sum"`, used by the loop to average over all micro-batches of a step).
- Logits are formed in `compute_dtype` (default: the active autocast dtype, else the inputs' dtype) and
  the softmax maths runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DISTILL_KINDS: tuple[str, ...] = ("reverse_kl", "forward_kl")
DEFAULT_CHUNK_ELEMENTS = 2**25  # logit elements per chunk: a (C, V) fp32 block of 128 MiB
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


@dataclass(frozen=True)
class _LossSpec:
    kind: str  # "reverse_kl" | "forward_kl" | "ce"
    temperature: float
    chunk_tokens: int
    chunk_elements: int
    compute_dtype: torch.dtype
    need_hidden_grad: bool
    need_weight_grad: bool


def _log_probs(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """log softmax(hidden @ weight.T / T) in fp32: hidden (C, H), weight (V, H) -> (C, V)."""
    logits = (hidden @ weight.T).float()  # (C, V); a fresh tensor, so the in-place division is safe
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


def _chunk_loss(
    spec: _LossSpec,
    log_p: Tensor,
    log_q: Tensor | None,
    targets: Tensor | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Per-token loss (C,) and d(sum of losses)/d(student logits) (C, V) for one chunk, all fp32.

    log_p (C, V) are the student's tempered log-probabilities, log_q (C, V) the teacher's; both are
    overwritten in place, so that at most three (C, V) blocks are alive at once.
    With p = softmax(s / T), q = softmax(t / T):
      reverse KL  kl = sum p (log p - log q),   d kl / d s = p * (log p - log q - kl) / T;
      forward KL  kl = sum q (log q - log p),   d kl / d s = (p - q) / T;
      CE          ce = -log p[y],               d ce / d s = p - onehot(y)   (T = 1).
    """
    temperature = spec.temperature
    if spec.kind == "ce":
        assert targets is not None
        loss = -log_p.gather(-1, targets[:, None]).squeeze(-1)  # (C,)
        if not need_grad:
            return loss, None
        grad = log_p.exp_()  # (C, V) p, in log_p's memory
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
        return loss, grad

    assert log_q is not None
    if spec.kind == "reverse_kl":
        p = log_p.exp()  # (C, V)
        log_ratio = log_p.sub_(log_q)  # (C, V) log p - log q, in log_p's memory
        loss = _row_dot(p, log_ratio)  # (C,)
        if not need_grad:
            return loss, None
        grad = p.mul_(log_ratio.sub_(loss[:, None])).div_(temperature)  # (C, V)
        return loss, grad
    q = log_q.exp()  # (C, V)
    log_ratio = log_q.sub_(log_p)  # (C, V) log q - log p, in log_q's memory
    loss = _row_dot(q, log_ratio)  # (C,)
    if not need_grad:
        return loss, None
    grad = log_p.exp_().sub_(q).div_(temperature)  # (C, V) (p - q) / T
    return loss, grad


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[c, v] * b[c, v] for (C, V) inputs -> (C,), without a (C, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Sum over rows of a loss of `hidden @ head_weight.T`, chunked over rows; see the module docstring.

    The student gradients are computed in forward (chunk by chunk) and saved; backward only scales them.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student_hidden: Tensor,  # (N, Hs)
        student_weight: Tensor,  # (V, Hs)
        teacher_hidden: Tensor | None,  # (N, Ht), constant
        teacher_weight: Tensor | None,  # (V, Ht), constant
        targets: Tensor | None,  # (N,) long, CE only
        spec: _LossSpec,
    ) -> Tensor:
        device_type = student_hidden.device.type
        compute = spec.compute_dtype
        with torch.autocast(device_type=device_type, enabled=False):
            weight_c = student_weight.to(compute)  # (V, Hs), a copy only when the dtype differs
            teacher_weight_c = teacher_weight.to(compute) if teacher_weight is not None else None
            grad_hidden = torch.empty_like(student_hidden) if spec.need_hidden_grad else None  # (N, Hs)
            # (V, Hs) accumulator in the weight's dtype: the gradient itself, no second copy at the end
            grad_weight = torch.zeros_like(student_weight) if spec.need_weight_grad else None
            need_grad = spec.need_hidden_grad or spec.need_weight_grad
            total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
            vocab, width = student_weight.shape
            rows = chunk_rows(vocab, spec.chunk_tokens, spec.chunk_elements)  # C: tokens per chunk
            slice_rows = max(1, spec.chunk_elements // width)  # vocabulary rows per weight-gradient slice
            for start in range(0, student_hidden.shape[0], rows):
                stop = min(start + rows, student_hidden.shape[0])
                hidden_c = student_hidden[start:stop].to(compute)  # (C, Hs)
                # Two (C, V) log-probability blocks; _chunk_loss overwrites them in place.
                loss, grad_logits = _chunk_loss(
                    spec,
                    _log_probs(hidden_c, weight_c, spec.temperature),
                    _log_probs(teacher_hidden[start:stop].to(compute), teacher_weight_c, spec.temperature)
                    if teacher_hidden is not None and teacher_weight_c is not None
                    else None,
                    targets[start:stop] if targets is not None else None,
                    need_grad,
                )
                total += loss.sum()
                if grad_logits is None:
                    continue
                grad_logits_c = grad_logits.to(compute)  # (C, V)
                if grad_hidden is not None:
                    grad_hidden[start:stop] = grad_logits_c @ weight_c  # (C, Hs)
                if grad_weight is not None:
                    if grad_weight.dtype == compute:
                        grad_weight.addmm_(grad_logits_c.T, hidden_c)  # (V, Hs), accumulated inside the GEMM
                    else:
                        for v0 in range(0, vocab, slice_rows):
                            v1 = min(v0 + slice_rows, vocab)
                            grad_weight[v0:v1] += grad_logits_c[:, v0:v1].T @ hidden_c  # (slice, Hs)
                del grad_logits, grad_logits_c
        # Kept as plain attributes (intermediates, not inputs or outputs), so that backward can hand them
        # over without a copy: scaled in place, they become the gradients (autograd stores them as .grad).
        ctx.grads = (grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's gradients were already handed over: backward runs once per forward")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(grad_output.to(grad.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def chunk_rows(vocab: int, chunk_tokens: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens in one chunk: at most `chunk_tokens`, and at most `chunk_elements` logits (at least 1)."""
    return max(1, min(chunk_tokens, chunk_elements // vocab))


def _check_chunking(chunk_tokens: int, chunk_elements: int) -> None:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens!r}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _select_rows(hidden: Tensor, mask: Tensor, name: str) -> Tensor:
    """hidden (..., H) and mask (...) -> the marked rows (N, H)."""
    if hidden.dim() < 2:
        raise ValueError(f"{name} must have shape (..., hidden), got {tuple(hidden.shape)}")
    if tuple(mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(hidden.shape)} without its last dim"
        )
    return hidden[mask.bool()]


def _check_head(weight: Tensor, hidden_rows: Tensor, name: str) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden_rows.shape[-1]:
        raise ValueError(
            f"{name} must have shape (vocab, {hidden_rows.shape[-1]}) to match its hidden states, "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != hidden_rows.device:
        raise ValueError(f"{name} is on {weight.device} but its hidden states are on {hidden_rows.device}")


def _resolve_compute_dtype(compute_dtype: torch.dtype | None, *tensors: Tensor) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _reduce(total: Tensor, count: int, reduction: str) -> Tensor:
    _check_choice("reduction", reduction, REDUCTIONS)
    return total / max(count, 1) if reduction == "mean" else total


def chunked_distill_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    mask: Tensor,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """KL between student and teacher next-token distributions over the marked rows, chunked over rows.

    student_hidden (..., Hs), student_head_weight (V, Hs), teacher_hidden (..., Ht),
    teacher_head_weight (V, Ht), mask (...) non-zero = trained. Returns a fp32 scalar.
    Gradients flow to the student hidden states and head weight only.
    """
    _check_choice("kind", kind, DISTILL_KINDS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_chunking(chunk_tokens, chunk_elements)
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} and student_hidden shape "
            f"{tuple(student_hidden.shape)} differ before the hidden dim"
        )
    student_rows = _select_rows(student_hidden, mask, "student_hidden")  # (N, Hs)
    teacher_rows = _select_rows(teacher_hidden.detach(), mask, "teacher_hidden")  # (N, Ht)
    _check_head(student_head_weight, student_rows, "student_head_weight")
    _check_head(teacher_head_weight, teacher_rows, "teacher_head_weight")
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"student vocab {student_head_weight.shape[0]} != teacher vocab {teacher_head_weight.shape[0]}"
        )
    grad_enabled = torch.is_grad_enabled()
    spec = _LossSpec(
        kind=kind,
        temperature=float(temperature),
        chunk_tokens=int(chunk_tokens),
        chunk_elements=int(chunk_elements),
        compute_dtype=_resolve_compute_dtype(compute_dtype, student_rows, student_head_weight),
        need_hidden_grad=grad_enabled and student_rows.requires_grad,
        need_weight_grad=grad_enabled and student_head_weight.requires_grad,
    )
    total = _ChunkedHeadLoss.apply(
        student_rows, student_head_weight, teacher_rows, teacher_head_weight.detach(), None, spec
    )
    return _reduce(total, student_rows.shape[0], reduction)


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    chunk_tokens: int = 1024,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Cross-entropy of `targets` under softmax(hidden @ head_weight.T) over the marked rows, chunked.

    hidden (..., H), head_weight (V, H), targets (...) long in [0, V), mask (...) non-zero = trained.
    Returns a fp32 scalar.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_chunking(chunk_tokens, chunk_elements)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match hidden shape {tuple(hidden.shape)} "
            "without its last dim"
        )
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 (torch.long), got {targets.dtype}")
    rows = _select_rows(hidden, mask, "hidden")  # (N, H)
    row_targets = targets[mask.bool()]  # (N,)
    _check_head(head_weight, rows, "head_weight")
    vocab = head_weight.shape[0]
    if row_targets.numel() and (int(row_targets.min()) < 0 or int(row_targets.max()) >= vocab):
        low, high = int(row_targets.min()), int(row_targets.max())
        raise ValueError(f"targets of trained rows must lie in [0, {vocab}), got [{low}, {high}]")
    grad_enabled = torch.is_grad_enabled()
    spec = _LossSpec(
        kind="ce",
        temperature=1.0,
        chunk_tokens=int(chunk_tokens),
        chunk_elements=int(chunk_elements),
        compute_dtype=_resolve_compute_dtype(compute_dtype, rows, head_weight),
        need_hidden_grad=grad_enabled and rows.requires_grad,
        need_weight_grad=grad_enabled and head_weight.requires_grad,
    )
    total = _ChunkedHeadLoss.apply(rows, head_weight, None, None, row_targets, spec)
    return _reduce(total, rows.shape[0], reduction)


def reference_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Unchunked KL from full logits (..., V); the plain-autograd reference the chunked loss is tested on."""
    _check_choice("kind", kind, DISTILL_KINDS)
    keep = mask.bool()
    log_p = torch.log_softmax(student_logits[keep].float() / temperature, dim=-1)  # (N, V)
    log_q = torch.log_softmax(teacher_logits.detach()[keep].float() / temperature, dim=-1)  # (N, V)
    if kind == "reverse_kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    else:
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)  # (N,)
    return _reduce(per_token.sum(), per_token.shape[0], reduction)


def reference_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor, *, reduction: str = "mean") -> Tensor:
    """Unchunked CE from full logits (..., V) and targets (...); the reference for `chunked_cross_entropy`."""
    keep = mask.bool()
    total = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return _reduce(total, int(keep.sum()), reduction)
