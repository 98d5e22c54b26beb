"""Where a stage's training runs is decided once: `Runtime.resolve` (the hardware section resolved, torchrun
or not) and `fit` (this process or torchrun); the words for a dead process are one function for the torchrun
launcher and the MMR workers. The paths themselves run in test_stages.py and test_distributed_training.py."""

from __future__ import annotations

import pickle

import pytest

from pipeline.config import DataConfig, HardwareConfig
from pipeline.convert.sharded import ModelSource
from pipeline.errors import how_it_ended
from pipeline.stages.common import Runtime
from pipeline.stages.launch import TrainingJob, TrainingPlan, fit
from pipeline.stages.workers import WorkerFailure
from pipeline.train import TrainConfig


def test_the_runtime_is_the_section_resolved_once():
    runtime = Runtime.resolve(HardwareConfig(device="cpu", threads=None))
    assert (runtime.device, runtime.precision, runtime.nproc, runtime.torchrun) == ("cpu", "fp32", 1, False)
    assert pickle.loads(pickle.dumps(runtime)) == runtime  # an MMR worker's job carries it
    mixed = Runtime.resolve(HardwareConfig(device="cpu", precision="bf16-mixed"))
    assert (str(mixed.dtype()), str(mixed.dtype(fp32=True))) == ("torch.bfloat16", "torch.float32")  # frozen, trained


def test_torchrun_when_asked_or_to_resume_a_distributed_state(tmp_path):
    cpu, train = HardwareConfig(device="cpu"), TrainConfig()
    assert not Runtime.resolve(cpu, train, tmp_path / "train_state").torchrun
    assert Runtime.resolve(HardwareConfig(device="cpu", nproc=2), train, tmp_path).torchrun
    assert Runtime.resolve(cpu, TrainConfig(cpu_offload=True), tmp_path).torchrun
    state = tmp_path / "train_state" / "dcp-step-00000002"
    state.mkdir(parents=True)
    (state / "trainer.pt").write_bytes(b"")
    assert Runtime.resolve(cpu, train, tmp_path / "train_state").torchrun


def test_the_plan_is_the_ranks_job_with_the_runtimes_device_and_precision(tmp_path):
    plan = TrainingPlan(TrainConfig(steps=3), DataConfig(), "distill", str(tmp_path), teacher_dir="teacher",
                        tokenizer_dir="teacher")
    runtime = plan.runtime(HardwareConfig(device="cpu", nproc=2))
    job = plan.job(runtime, ModelSource("teacher", (1,), 0))
    assert (job.device, job.precision, job.state_dir, job.teacher_dir, job.tokenizer_dir) == (
        "cpu", "fp32", str(tmp_path / "train_state"), "teacher", "teacher")
    assert TrainingJob.from_json(job.to_json()) == job
    assert plan.job(runtime).tokenizer_dir is None  # the student the launcher saves carries its tokenizer


def test_a_student_built_from_its_files_needs_torchrun(tmp_path):
    plan = TrainingPlan(TrainConfig(), DataConfig(), "sft", str(tmp_path), tokenizer_dir="checkpoint")
    with pytest.raises(ValueError, match="torchrun only"):
        fit(ModelSource("checkpoint"), None, plan, plan.runtime(HardwareConfig(device="cpu")), reporter=None,
            label="H-1", out_dir=tmp_path / "out")


def test_a_dead_process_is_described_in_the_same_words_everywhere():
    assert how_it_ended(-9) == "was killed by signal SIGKILL"
    assert how_it_ended(3) == "exited with code 3"
    assert WorkerFailure(0, None, exitcode=-9).how() == how_it_ended(-9)
    assert WorkerFailure(0, None, message="ValueError: bad").how() == "ValueError: bad"
