"""Mixed precision: why the weights must be fp32 masters, and the bf16-mixed loop (CPU autocast)."""

from __future__ import annotations

import pytest
import torch

from pipeline.train import StepMetrics, TrainConfig, train


def _sft_config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(steps=1, lr=1e-5, warmup_steps=0, trainable="all", loss="ce", batch_size=4,
                                 max_length=16, log_every=1, grad_clip=None, weight_decay=0.0), **changes})


def _fraction_changed(before: dict[str, torch.Tensor], model) -> float:
    changed = total = 0
    for name, param in model.named_parameters():
        if param.dim() == 2:  # the matrices: the weights the recipe's learning rates must move
            changed += int((param.detach().float() != before[name].float()).sum())
            total += param.numel()
    return changed / total


def test_bf16_parameters_lose_most_updates_at_lr_1e5_while_fp32_masters_keep_them(tiny_llama, random_batches):
    """One AdamW step at the recipe's learning rate (1e-5): its update (about lr per weight) is below half
    a bf16 ulp of most weights, so bf16 parameters round back to where they were; the fp32 master weights
    of a bf16-mixed step all move."""
    batches = random_batches(1)
    bf16 = tiny_llama(0).to(torch.bfloat16)
    before = {name: param.detach().clone() for name, param in bf16.named_parameters()}
    bf16.train()
    logits = bf16(**{k: v for k, v in batches[0].items() if k != "loss_mask"}).logits.float()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      batches[0]["input_ids"][:, 1:].reshape(-1)).backward()
    optimizer = torch.optim.AdamW(bf16.parameters(), lr=1e-5, weight_decay=0.0)
    optimizer.step()
    bf16_moved = _fraction_changed(before, bf16)

    master = tiny_llama(0)
    before = {name: param.detach().clone() for name, param in master.named_parameters()}
    train(master, batches, _sft_config(), precision="bf16-mixed")
    master_moved = _fraction_changed(before, master)
    print(f"fraction of matrix weights changed by one step at lr 1e-5: bf16 {bf16_moved:.3f}, fp32 masters "
          f"{master_moved:.3f}")
    assert bf16_moved < 0.2
    assert master_moved > 0.9  # (embedding rows of tokens absent from the batch get no gradient)


def test_the_loop_refuses_bf16_trainable_parameters(tiny_llama, random_batches):
    model = tiny_llama(0).to(torch.bfloat16)
    with pytest.raises(ValueError, match="trainable parameters must be float32 master weights, got torch.bfloat16"):
        train(model, random_batches(1), _sft_config(), precision="bf16-mixed")
    with pytest.raises(ValueError, match="precision must be one of"):
        train(tiny_llama(0), random_batches(1), _sft_config(), precision="bf16")


def test_bf16_mixed_distillation_with_a_bf16_teacher_follows_fp32(tiny_llama, random_batches):
    """The bf16-mixed loop on CPU (autocast): masters stay fp32, the loss falls like the fp32 run's."""
    teacher = tiny_llama(1).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a confident teacher: a KL worth learning
    batches = random_batches(4)
    cfg = TrainConfig(steps=12, lr=3e-3, warmup_steps=2, trainable="all", batch_size=4, max_length=16,
                      log_every=1)
    runs = {}
    for precision, teacher_dtype in (("fp32", torch.float32), ("bf16-mixed", torch.bfloat16)):
        student = tiny_llama(0)
        metrics: list[StepMetrics] = []
        train(student, batches, cfg, teacher=teacher.to(teacher_dtype), callback=metrics.append, precision=precision)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        runs[precision] = [m.loss for m in metrics]
    fp32, mixed = runs["fp32"], runs["bf16-mixed"]
    print(f"fp32 {fp32[0]:.4f} -> {fp32[-1]:.4f}; bf16-mixed {mixed[0]:.4f} -> {mixed[-1]:.4f}")
    assert mixed[-1] < 0.8 * mixed[0]
    assert abs(mixed[0] - fp32[0]) < 0.02 * fp32[0]  # the same first step up to bf16 compute
    assert abs(mixed[-1] - fp32[-1]) < 0.1 * fp32[0]
