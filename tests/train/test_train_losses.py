"""Chunked KL / CE losses: against direct formulas, against the unchunked reference, masks, memory."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import Tensor
from torch.distributions import Categorical, kl_divergence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.train.losses import (
    chunked_cross_entropy,
    chunked_distill_loss,
    reference_cross_entropy,
    reference_distill_loss,
)

KINDS = ["reverse_kl", "forward_kl"]


def _inputs(tokens: int = 30, hidden: int = 8, teacher_hidden: int = 12, vocab: int = 50, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=generator, requires_grad=True)  # (N, Hs)
    student_weight = torch.randn(vocab, hidden, generator=generator, requires_grad=True)  # (V, Hs)
    teacher_hidden = torch.randn(tokens, teacher_hidden, generator=generator)  # (N, Ht)
    teacher_weight = torch.randn(vocab, teacher_hidden.shape[1], generator=generator)  # (V, Ht)
    mask = torch.rand(tokens, generator=generator) > 0.3  # (N,)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reference_kl_matches_torch_distributions(kind: str, temperature: float) -> None:
    generator = torch.Generator().manual_seed(1)
    student_logits = torch.randn(2, 5, 11, generator=generator) * 3  # (B, T, V)
    teacher_logits = torch.randn(2, 5, 11, generator=generator) * 3
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    student = Categorical(logits=student_logits / temperature)
    teacher = Categorical(logits=teacher_logits / temperature)
    per_token = kl_divergence(student, teacher) if kind == "reverse_kl" else kl_divergence(teacher, student)  # (B, T)
    expected = per_token[mask.bool()].mean()
    got = reference_distill_loss(student_logits, teacher_logits, mask, kind, temperature)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the explicit formula, sum_v p (log p - log q) with p the first argument of the KL
    log_s = torch.log_softmax(student_logits / temperature, -1)
    log_t = torch.log_softmax(teacher_logits / temperature, -1)
    first, second = (log_s, log_t) if kind == "reverse_kl" else (log_t, log_s)
    explicit = (first.exp() * (first - second)).sum(-1)[mask.bool()].mean()
    torch.testing.assert_close(got, explicit, rtol=1e-5, atol=1e-6)
    other_kind = "forward_kl" if kind == "reverse_kl" else "reverse_kl"
    other = reference_distill_loss(student_logits, teacher_logits, mask, other_kind, temperature)
    assert not torch.allclose(got, other)  # the two directions differ: the kind is really used


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 64])  # 7 does not divide the 30 tokens; 64 > N
def test_chunked_kl_equals_unchunked_values_and_gradients(kind: str, temperature: float, chunk_tokens: int) -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()
    chunked = chunked_distill_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, kind, temperature, chunk_tokens
    )
    chunked_grads = torch.autograd.grad(chunked, [student_hidden, student_weight])
    reference = reference_distill_loss(
        student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask, kind, temperature
    )
    reference_grads = torch.autograd.grad(reference, [student_hidden, student_weight])
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-6)
    for got, expected in zip(chunked_grads, reference_grads):
        assert expected.abs().max() > 1e-3  # the comparison is not between two zero tensors
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
def test_chunked_cross_entropy_equals_unchunked(chunk_tokens: int) -> None:
    student_hidden, student_weight, _, _, mask = _inputs()
    generator = torch.Generator().manual_seed(3)
    targets = torch.randint(0, student_weight.shape[0], (student_hidden.shape[0],), generator=generator)
    chunked = chunked_cross_entropy(student_hidden, student_weight, targets, mask, chunk_tokens)
    chunked_grads = torch.autograd.grad(chunked, [student_hidden, student_weight])
    reference = reference_cross_entropy(student_hidden @ student_weight.T, targets, mask)
    reference_grads = torch.autograd.grad(reference, [student_hidden, student_weight])
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-6)
    for got, expected in zip(chunked_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batched_hidden_and_sum_reduction() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs(tokens=24)
    shape = (4, 6)
    mean = chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=5)
    batched_sum = chunked_distill_loss(
        student_hidden.reshape(*shape, -1),  # (B, T, Hs)
        student_weight,
        teacher_hidden.reshape(*shape, -1),
        teacher_weight,
        mask.reshape(shape),
        chunk_tokens=5,
        reduction="sum",
    )
    torch.testing.assert_close(batched_sum, mean * mask.sum(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS + ["ce"])
def test_masked_tokens_do_not_contribute(kind: str) -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()
    targets = torch.randint(0, student_weight.shape[0], mask.shape, generator=torch.Generator().manual_seed(4))

    def loss(student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        if kind == "ce":
            return chunked_cross_entropy(student, student_weight, target, mask, 4)
        return chunked_distill_loss(student, student_weight, teacher, teacher_weight, mask, kind, 1.0, 4)

    base = loss(student_hidden, teacher_hidden, targets)
    (grad_hidden,) = torch.autograd.grad(base, [student_hidden])
    assert grad_hidden[~mask].abs().max() == 0 and grad_hidden[mask].abs().max() > 0
    # garbage in the masked-out rows (even non-finite) changes nothing
    noisy_student = student_hidden.detach().clone()
    noisy_teacher = teacher_hidden.clone()
    noisy_student[~mask] = 1e4
    noisy_teacher[~mask] = float("nan")
    noisy_targets = targets.clone()
    noisy_targets[~mask] = 10_000  # out of the vocabulary: only trained rows are checked
    assert torch.equal(loss(noisy_student, noisy_teacher, noisy_targets), base.detach())
    # and the mean is over the trained rows only: the same as the loss of those rows alone
    rows, all_rows = student_hidden[mask].detach(), mask[mask]
    if kind == "ce":
        kept = chunked_cross_entropy(rows, student_weight, targets[mask], all_rows, 4)
    else:
        kept = chunked_distill_loss(rows, student_weight, teacher_hidden[mask], teacher_weight, all_rows, kind, 1.0, 4)
    torch.testing.assert_close(kept, base.detach(), rtol=1e-6, atol=1e-6)


def test_empty_mask_gives_zero_loss_and_zero_gradient() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()
    loss = chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and student_hidden.grad.abs().max() == 0 and student_weight.grad.abs().max() == 0


def test_teacher_is_a_constant_and_no_grad_gives_the_same_value() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()
    teacher_hidden.requires_grad_(True)
    teacher_weight.requires_grad_(True)
    loss = chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=4)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    with torch.no_grad():
        value = chunked_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=4
        )
    assert torch.equal(value, loss.detach())


def test_bf16_compute_stays_close_to_fp32() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()
    full = chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=8)
    half = chunked_distill_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=8,
        compute_dtype=torch.bfloat16,
    )
    (grad_half,) = torch.autograd.grad(half, [student_hidden])
    assert grad_half.dtype == torch.float32  # gradients come back in the input's dtype
    torch.testing.assert_close(half, full.detach(), rtol=5e-2, atol=5e-2)


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an argument's storage: nothing new was allocated
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if size and key not in self.live and key not in inputs:
                self.live[key] = size
                self.current += size
                self.peak = max(self.peak, self.current)
                self.largest = max(self.largest, size)
                weakref.finalize(storage, self._release, key)
        return out


def _peak_bytes(run) -> tuple[int, int]:
    mode = _LiveTensorBytes()
    with mode:
        run()
    return mode.peak, mode.largest


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward_never_hold_full_logits(kind: str) -> None:
    tokens, hidden, vocab, chunk = 1024, 8, 512, 32
    student_hidden, student_weight, teacher_hidden, teacher_weight, _ = _inputs(tokens, hidden, hidden, vocab)
    mask = torch.ones(tokens, dtype=torch.bool)
    full_logits_bytes = tokens * vocab * 4  # one (N, V) fp32 block

    def chunked() -> None:
        loss = chunked_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, kind, 1.0, chunk
        )
        loss.backward()

    def unchunked() -> None:
        loss = reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask, kind)
        loss.backward()

    chunked_peak, chunked_largest = _peak_bytes(chunked)
    reference_peak, _ = _peak_bytes(unchunked)
    assert reference_peak >= 2 * full_logits_bytes  # the probe sees what the unchunked version holds
    assert chunked_largest <= chunk * vocab * 4  # no tensor bigger than one chunk's logits
    # four (C, V) blocks plus a few (N, H) / (V, H) copies and gradients, far below one (N, V) block
    budget = 4 * chunk * vocab * 4 + 6 * (tokens + vocab) * hidden * 4
    assert chunked_peak <= budget < full_logits_bytes / 2, (chunked_peak, budget)


@pytest.mark.parametrize(
    ("dtype", "compute_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)],  # last: autocast training
)
def test_peak_memory_does_not_grow_with_the_vocabulary(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> None:
    """Chunks sized by elements and the head gradient accumulated in its own dtype (added in vocabulary
    slices when the compute dtype differs): the memory above the inputs, the two gradients and the heads
    cast to the compute dtype (copies of inputs) is the same at vocab 4096 and 16384; fixed-token chunks
    grow it 4x."""
    tokens, hidden, budget = 2048, 16, 2**16
    cast = compute_dtype is not None and compute_dtype != dtype

    def extra_bytes(vocab: int, chunk_elements: int, chunk_tokens: int) -> int:
        student_hidden, student_weight, teacher_hidden, teacher_weight, _ = _inputs(tokens, hidden, hidden, vocab)
        student_hidden = student_hidden.detach().to(dtype).requires_grad_(True)
        student_weight = student_weight.detach().to(dtype).requires_grad_(True)
        teacher_hidden, teacher_weight = teacher_hidden.to(dtype), teacher_weight.to(dtype)
        mask = torch.ones(tokens, dtype=torch.bool)

        def run() -> None:
            chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                 chunk_tokens=chunk_tokens, chunk_elements=chunk_elements,
                                 compute_dtype=compute_dtype).backward()

        peak, _ = _peak_bytes(run)
        assert student_weight.grad.dtype == dtype
        gradients = (tokens + vocab) * hidden * dtype.itemsize
        head_casts = 2 * vocab * hidden * compute_dtype.itemsize if cast else 0  # student and teacher heads
        return peak - gradients - head_casts

    small, large = extra_bytes(4096, budget, tokens), extra_bytes(16384, budget, tokens)
    assert large <= 1.1 * small, (small, large)
    # the probe does see vocabulary-sized chunks: a fixed 64-token chunk grows with the vocabulary
    fixed_small, fixed_large = extra_bytes(4096, 2**40, 64), extra_bytes(16384, 2**40, 64)
    assert fixed_large >= 3 * fixed_small, (fixed_small, fixed_large)


def test_fp32_head_gradient_added_in_vocabulary_slices_matches_the_reference() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()  # vocab 50, hidden 8
    reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask).backward()
    expected = student_weight.grad.clone()
    student_weight.grad = None
    # 120 elements: 2 rows a chunk, and the (V, H) gradient added 15 vocabulary rows at a time (4 slices)
    chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=64,
                         chunk_elements=120, compute_dtype=torch.bfloat16).backward()
    assert student_weight.grad.dtype == torch.float32
    error = (student_weight.grad - expected).norm() / expected.norm()
    assert error < 3e-2, error


def test_chunk_elements_sets_the_rows_per_chunk() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()  # vocab 50, 30 tokens
    expected = reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask)
    sizes: list[int] = []

    class _ChunkRows(TorchDispatchMode):  # records the rows of every (rows, vocab) logits product
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default and out.shape[-1] == 50:
                sizes.append(out.shape[0])
            return out

    with _ChunkRows():
        got = chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                   chunk_tokens=64, chunk_elements=120)  # 120 // 50 = 2 rows a chunk
    assert sizes and max(sizes) == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bf16_head_gradient_stays_close_to_the_fp32_reference() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs(64, 16, 16, 300)
    reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask).backward()
    expected = student_weight.grad.clone()
    weight = student_weight.detach().to(torch.bfloat16).requires_grad_(True)
    chunked_distill_loss(student_hidden.detach().to(torch.bfloat16), weight, teacher_hidden.to(torch.bfloat16),
                         teacher_weight.to(torch.bfloat16), mask, chunk_tokens=8).backward()  # 8 chunks summed
    assert weight.grad.dtype == torch.bfloat16
    error = (weight.grad.float() - expected).norm() / expected.norm()
    assert error < 3e-2, error


def test_autograd_graph_saves_no_logits() -> None:
    tokens, vocab, chunk = 256, 128, 16
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs(tokens, 8, 8, vocab)
    saved: list[int] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=chunk)
    assert saved and max(saved) < chunk * vocab  # only the (N, H) / (V, H) gradients are kept
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask)
    assert max(saved) >= int(mask.sum()) * vocab  # the unchunked graph does keep (N, V) tensors


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"kind": "js"}, "kind must be one of"),
        ({"chunk_tokens": 0}, "chunk_tokens must be >= 1"),
        ({"chunk_elements": 0}, "chunk_elements must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"mask": torch.ones(29, dtype=torch.bool)}, "mask shape (29,) does not match student_hidden"),
        ({"teacher_weight": torch.randn(51, 12)}, "student vocab 50 != teacher vocab 51"),
        ({"student_weight": torch.randn(50, 9)}, "student_head_weight must have shape (vocab, 8)"),
        ({"teacher_hidden": torch.randn(31, 12)}, "teacher_hidden shape (31, 12) and student_hidden shape (30, 8)"),
        ({"reduction": "max"}, "reduction must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(change: dict, fragment: str) -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _inputs()
    arguments = {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "mask": mask,
        "kind": "reverse_kl",
        "temperature": 1.0,
        "chunk_tokens": 4,
        "chunk_elements": 2**20,
        "reduction": "mean",
    } | change
    with pytest.raises(ValueError) as error:
        chunked_distill_loss(
            arguments["student_hidden"],
            arguments["student_weight"],
            arguments["teacher_hidden"],
            arguments["teacher_weight"],
            arguments["mask"],
            arguments["kind"],
            arguments["temperature"],
            arguments["chunk_tokens"],
            chunk_elements=arguments["chunk_elements"],
            reduction=arguments["reduction"],
        )
    assert fragment in str(error.value)


def test_cross_entropy_rejects_out_of_vocabulary_targets() -> None:
    student_hidden, student_weight, _, _, mask = _inputs()
    targets = torch.full(mask.shape, 50, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets of trained rows must lie in \[0, 50\)"):
        chunked_cross_entropy(student_hidden, student_weight, targets, mask)
