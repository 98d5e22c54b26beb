"""CUDA: models built sharded (NCCL, a group of one) hold the unsharded path's weights on the GPU, train the
same curve under bf16-mixed, and train with CPU-offloaded shards (skipped without a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from pipeline.config import HardwareConfig
from pipeline.convert import hybridize
from pipeline.convert.sharded import ModelSource, build_sharded, gathered_tensor
from pipeline.stages.common import load_model
from pipeline.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VOCAB = 96
CUDA = HardwareConfig(device="cuda", precision="bf16-mixed")
# one process, the same autocast: the sharded and plain losses agree to float32 reduction order
SAME_RTOL = 1e-5


@contextlib.contextmanager
def nccl_group(tmp_path):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def teacher_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def batches(count: int = 3):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (4, 32), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids).bool()})
    return out


CFG = TrainConfig(steps=3, lr=3e-3, batch_size=4, max_length=32, trainable="all", log_every=1)


def curve(student, teacher) -> list[float]:
    losses: list[float] = []
    train(student, batches(), CFG, teacher=teacher, callback=lambda m: losses.append(m.loss), precision="bf16-mixed")
    return losses


def test_sharded_models_on_the_gpu_hold_and_train_as_the_unsharded_ones(tmp_path, teacher_dir):
    device = torch.device("cuda", 0)
    plain_student = hybridize(load_model(teacher_dir, CUDA, "teacher", fp32=True), [1, 2], seed=3)
    initial = {name: param.detach().cpu().clone() for name, param in plain_student.named_parameters()}
    buffers = {name: buffer.cpu() for name, buffer in plain_student.named_buffers()}
    plain = curve(plain_student, load_model(teacher_dir, CUDA, "teacher"))  # the plain loop: no process group
    with nccl_group(tmp_path):
        student = build_sharded(ModelSource(str(teacher_dir), (1, 2), 3), dtype=torch.float32, device=device,
                                role="student")
        for name, param in initial.items():
            built = gathered_tensor(student, name)
            assert built.dtype == param.dtype and torch.equal(built, param), name
        assert {name: torch.equal(buffer.cpu(), buffers[name]) for name, buffer in student.named_buffers()} == \
            {name: True for name in buffers}
        teacher = build_sharded(ModelSource(str(teacher_dir)), dtype=torch.bfloat16, device=device, role="teacher")
        assert all(buffer.device.type == "cuda" for buffer in student.buffers())
        sharded = curve(student, teacher)
    assert sharded == pytest.approx(plain, rel=SAME_RTOL)


def test_a_student_built_with_offloaded_shards_trains(tmp_path, teacher_dir):
    with nccl_group(tmp_path):
        offloaded_training(teacher_dir)


def offloaded_training(teacher_dir):
    device = torch.device("cuda", 0)
    student = build_sharded(ModelSource(str(teacher_dir), (1,), 0), dtype=torch.float32, device=device,
                            role="student", cpu_offload=True)
    assert all(param.to_local().device.type == "cpu" for param in student.parameters())
    assert all(buffer.device.type == "cuda" for buffer in student.buffers())
    teacher = build_sharded(ModelSource(str(teacher_dir)), dtype=torch.bfloat16, device=device, role="teacher")
    cfg = TrainConfig(steps=2, lr=3e-3, batch_size=4, max_length=32, trainable="all", log_every=1, cpu_offload=True)
    losses: list[float] = []
    train(student, batches(2), cfg, teacher=teacher, callback=lambda m: losses.append(m.loss), precision="bf16-mixed")
    assert len(losses) == 2 and all(loss == loss for loss in losses)
