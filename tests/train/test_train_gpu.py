"""CUDA checks of the losses and the loop: bf16 autocast path, real peak memory (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.train import StepMetrics, TrainConfig, chunked_distill_loss, reference_distill_loss, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _head_inputs(tokens: int, hidden: int, vocab: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    options = {"device": "cuda", "generator": generator}
    student_hidden = torch.randn(tokens, hidden, **options).requires_grad_(True)  # (N, H)
    student_weight = (torch.randn(vocab, hidden, **options) / hidden**0.5).requires_grad_(True)  # (V, H)
    teacher_hidden = torch.randn(tokens, hidden, **options)  # (N, H)
    teacher_weight = torch.randn(vocab, hidden, **options) / hidden**0.5  # (V, H)
    mask = torch.ones(tokens, dtype=torch.bool, device="cuda")
    return student_hidden, student_weight, teacher_hidden, teacher_weight, mask


def test_bf16_autocast_loss_and_gradients_stay_close_to_fp32() -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _head_inputs(1024, 256, 8000)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=256
        )
    grads = torch.autograd.grad(loss, [student_hidden, student_weight])
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    reference = reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask)
    reference_grads = torch.autograd.grad(reference, [student_hidden, student_weight])
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=1e-3)
    for got, expected in zip(grads, reference_grads):
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
        assert cosine > 0.99, cosine


def _peak_bytes(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_peak_cuda_memory_stays_far_below_one_full_logits_block() -> None:
    tokens, hidden, vocab, chunk = 16384, 1024, 32000, 1024
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask = _head_inputs(tokens, hidden, vocab)
    full_logits_bytes = tokens * vocab * 4  # 2.1 GB

    def chunked() -> None:
        loss = chunked_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_tokens=chunk
        )
        loss.backward()

    def unchunked() -> None:
        reference_distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask).backward()

    chunked_peak = _peak_bytes(chunked)
    student_hidden.grad = student_weight.grad = None
    reference_peak = _peak_bytes(unchunked)
    print(f"peak: chunked {chunked_peak / 2**20:.0f} MiB, unchunked {reference_peak / 2**20:.0f} MiB")
    assert reference_peak > 2 * full_logits_bytes
    # about three (C, V) fp32 blocks plus the (N, H) / (V, H) row copies and gradients, under one (N, V) block
    budget = 4 * chunk * vocab * 4 + 4 * (tokens + vocab) * hidden * 4
    assert chunked_peak < budget < full_logits_bytes


def test_train_on_cuda_bf16_mixed_with_a_bf16_teacher() -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).cuda()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    student = LlamaForCausalLM(config).cuda()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 256, (8, 64), generator=generator)} for _ in range(4)]
    metrics: list[StepMetrics] = []
    cfg = TrainConfig(steps=40, lr=3e-3, warmup_steps=4, trainable="all", batch_size=8, max_length=64,
                      kl_chunk_tokens=128, log_every=1)
    result = train(student, batches, cfg, teacher=teacher.to(torch.bfloat16), callback=metrics.append,
                   precision="bf16-mixed")
    print(f"loss {metrics[0].loss:.3f} -> {result.final_loss:.3f}, {metrics[-1].tokens_per_second:.0f} tokens/s")
    assert result.final_loss < 0.8 * metrics[0].loss
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights, bf16 compute


def test_compiled_blocks_train_like_eager_blocks() -> None:
    """compile_blocks=True (torch.compile per decoder block) follows the eager run's losses, keeps the
    parameter names, and leaves the models eager when train() returns."""
    from pipeline.model import HybridConfig, HybridForCausalLM

    def models():
        torch.manual_seed(0)
        shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_inner=64, mamba_d_xb=32,
                     mamba_d_state=8, mamba_dt_rank=4)
        teacher = HybridForCausalLM(HybridConfig(**shape, layer_types=["attention"] * 4)).cuda().eval()
        student = HybridForCausalLM(HybridConfig(**shape, layer_types=["attention", "mamba"] * 2)).cuda()
        return teacher, student

    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 256, (4, 64), generator=generator)} for _ in range(3)]
    losses = {}
    for compiled in (False, True):
        teacher, student = models()
        names = [name for name, _ in student.named_parameters()]
        metrics: list[StepMetrics] = []
        cfg = TrainConfig(steps=6, lr=1e-3, trainable="all", batch_size=4, max_length=64, kl_chunk_tokens=128,
                          log_every=1, compile_blocks=compiled)
        train(student, batches, cfg, teacher=teacher, callback=metrics.append)
        losses[compiled] = [m.loss for m in metrics]
        assert [name for name, _ in student.named_parameters()] == names
        assert all(block._compiled_call_impl is None for block in student.model.layers)
    print(f"eager {losses[False]}\ncompiled {losses[True]}")
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2, atol=1e-3)
