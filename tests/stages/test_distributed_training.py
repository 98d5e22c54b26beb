"""Training under torchrun on CPU (gloo): the stages' launcher and worker, FSDP2, DCP resume, failures.

Every torchrun launch here costs seconds (each rank imports torch and transformers), so the launches are
few: one run resumed twice (2 -> 1 -> 2 processes) covers both process counts, both directions of a
resharded resume and both ways in (the student built sharded from files, or held by the stage) and out
(gathered, or through each rank's shards); its loss curve is compared with the plain single-process loop's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import DataConfig, HardwareConfig
from pipeline.convert import hybridize
from pipeline.convert.sharded import ModelSource
from pipeline.data.demo import DemoDataConfig
from pipeline.stages.common import StageData, StageError, load_model, load_tokenizer
from pipeline.stages.launch import (
    TrainingJob,
    run_torchrun,
    torchrun_command,
    train_sharded_under_torchrun,
    train_under_torchrun,
)
from pipeline.train import TrainConfig, train
from pipeline.train.batches import PreparedBatch
from pipeline.train.distributed import step_share
from tests.teachers import save_tiny_teacher

HERE = Path(__file__).parent
CPU = HardwareConfig(device="cpu", precision="fp32")
# Two processes sum a step's gradient in another order than one: the curves agree to float32 noise.
LOSS_RTOL = 1e-4


class Collecting:
    """A reporter that keeps the training curve (train/loss by step) and the progress lines."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.lines: list[str] = []

    def log_metrics(self, metrics, step=None) -> None:
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]

    def log_artifact(self, path) -> None:
        pass

    def progress(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    teacher_dir = save_tiny_teacher(folder / "teacher")
    data = DataConfig(max_length=64, demo=DemoDataConfig(n_train=48, n_validation=8, n_test=8, n_text_train=8,
                                                         n_text_validation=4, n_text_test=4))
    # batch_size 3: two ranks split each micro-batch's rows 2 + 1
    cfg = TrainConfig(steps=4, lr=3e-3, warmup_steps=1, batch_size=3, max_length=64, trainable="all", log_every=1)
    tokenizer = load_tokenizer(teacher_dir)
    student = hybridize(load_model(teacher_dir, CPU, "teacher", fp32=True), [1], seed=0)
    reference, plain = hybridize(load_model(teacher_dir, CPU, "teacher", fp32=True), [1], seed=0), Collecting()
    train(reference, StageData(data, tokenizer).batch_source("distill", cfg.batch_size, cfg.seed), cfg,
          teacher=load_model(teacher_dir, CPU, "teacher"), callback=lambda m: plain.log_metrics({"train/loss": m.loss}, m.step))
    return folder, teacher_dir, data, cfg, tokenizer, student, reference, plain.losses


def test_torchrun_runs_resumed_on_other_process_counts_match_one_plain_process(setup):
    """Steps 1-2 on two processes, step 3 on one (a 2 -> 1 resume), step 4 on two (1 -> 2). The first and
    last launches build the student sharded from the teacher's files (the last one writing it back through
    each rank's DCP shards, train.save_sharded); the middle one trains the stage's student held in memory."""
    folder, teacher_dir, data, cfg, tokenizer, student, reference, plain = setup
    state_dir, reporter = folder / "state", Collecting()
    job = TrainingJob(train=cfg, data=data, batches="distill", state_dir=str(state_dir), precision="fp32", device="cpu",
                      teacher_dir=str(teacher_dir), student=ModelSource(str(teacher_dir), (1,), 0),
                      tokenizer_dir=str(teacher_dir))
    for nproc, max_steps, done, way in ((2, 2, 2, "sharded"), (1, 1, 3, "in memory"), (2, None, 4, "saved sharded")):
        hardware = HardwareConfig(device="cpu", nproc=nproc)
        if way == "in memory":
            result = train_under_torchrun(student, tokenizer, dataclasses.replace(job, max_steps=max_steps, student=None),
                                          hardware=hardware, work_dir=folder / "work", reporter=reporter, label="H-1")
        else:
            launch = dataclasses.replace(job, max_steps=max_steps,
                                         train=dataclasses.replace(cfg, save_sharded=way == "saved sharded"))
            result = train_sharded_under_torchrun(launch, hardware=hardware, work_dir=folder / "work",
                                                  out_dir=folder / f"out-{done}", reporter=reporter, label="H-1")
        assert (result.steps_done, result.completed) == (done, done == cfg.steps)
        assert result.state_path == state_dir / f"dcp-step-{done:08d}"
    assert sorted(reporter.losses) == [1, 2, 3, 4]  # rank 0's curve streamed into the reporter, once per step
    assert any("H-1 step 4: loss" in line for line in reporter.lines)
    for step, loss in plain.items():
        assert reporter.losses[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    # the final weights, written by the ranks as save_checkpoint writes them
    trained = load_file(folder / "out-4" / "model.safetensors")
    expected = reference.state_dict()
    assert sorted(trained) == sorted(expected)
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4, msg=name)
    # after step 3 the stage's in-memory student was given the gathered weights
    step_3 = load_file(folder / "out-2" / "model.safetensors")
    assert any(not torch.equal(step_3[name], student.state_dict()[name]) for name in step_3)


def test_a_dead_rank_is_one_line_naming_it(tmp_path):
    command = torchrun_command(HardwareConfig(device="cpu", nproc=2), [], entry=(str(HERE / "dying_rank.py"),))
    with pytest.raises(StageError) as caught:
        run_torchrun(command, tmp_path, Collecting(), callback=None)
    message = str(caught.value)
    assert "\n" not in message
    assert "rank 1 was killed by signal SIGKILL" in message, message


def _batch(rows: int, first_token: int) -> PreparedBatch:
    ids = torch.arange(first_token, first_token + rows)[:, None].repeat(1, 4)  # (rows, 4): row r holds its index
    mask = torch.ones_like(ids)
    return PreparedBatch(input_ids=ids, attention_mask=mask, target_mask=mask[:, 1:].bool(), input_tokens=ids.numel())


@pytest.mark.parametrize("micro_batches,rows", [(4, 3), (1, 3), (1, 1)])
def test_each_rank_takes_its_share_of_the_global_step(micro_batches, rows):
    step = [_batch(rows, 100 * index) for index in range(micro_batches)]
    shares = [step_share(step, rank, 2) for rank in range(2)]
    assert len(shares[0]) == len(shares[1])  # every rank runs the same number of forwards and backwards
    trained = sorted(int(batch.input_ids[row, 0]) for share in shares for batch in share
                     for row in range(batch.input_ids.shape[0]) if batch.target_mask[row].any())
    assert trained == sorted(int(batch.input_ids[row, 0]) for batch in step for row in range(rows))


def test_a_step_under_torchrun_loads_no_model_here_and_saves_what_the_plain_step_saves(tmp_path, monkeypatch):
    """run_step with hardware.nproc=2: the stage's process builds no model (load_model is never called), the
    ranks build the parent's conversion sharded and write the checkpoint; the same files as the plain step,
    with the same weights up to the two processes' float noise."""
    import json

    from pipeline.stages import common, run_step
    from tests.stages.conftest import tiny_config

    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    parent = hybridize(load_model(teacher_dir, CPU, "teacher", fp32=True), [0], seed=0)
    common.save_checkpoint(parent, load_tokenizer(teacher_dir), tmp_path / "H-1", "float32")
    (tmp_path / "mmr").mkdir()
    (tmp_path / "mmr" / "mmr.json").write_text(json.dumps({"n_mamba": 1, "ranking": [
        {"layer": 2, "loss": 0.1}, {"layer": 1, "loss": 0.2}, {"layer": 3, "loss": 0.3}]}))
    cfg = tiny_config()

    def step(nproc: int, name: str) -> dict:
        hardware = dataclasses.replace(cfg.hardware, nproc=nproc)
        return run_step(cfg.train, cfg.data.view("distill"), hardware, cfg.seed, 2, teacher=teacher_dir,
                        parent=tmp_path / "H-1", mmr=tmp_path / "mmr", out_dir=tmp_path / name,
                        work_dir=tmp_path / f"work-{name}", reporter=Collecting())

    plain = step(1, "plain")
    loads: list[str] = []
    monkeypatch.setattr("pipeline.stages.convert.load_model", lambda *args, **kwargs: loads.append(args[0]))
    sharded = step(2, "sharded")
    assert loads == []
    for key in ("converted_layers", "layer_pattern", "n_mamba", "steps", "tokens_seen"):
        assert sharded[key] == plain[key], key
    assert sharded["final_distill_loss"] == pytest.approx(plain["final_distill_loss"], rel=LOSS_RTOL)
    files = sorted(path.name for path in (tmp_path / "plain").iterdir())
    assert sorted(path.name for path in (tmp_path / "sharded").iterdir()) == files
    assert (tmp_path / "plain" / "config.json").read_text() == (tmp_path / "sharded" / "config.json").read_text()
    expected, trained = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "sharded" / "model.safetensors")
    assert sorted(trained) == sorted(expected)
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4, msg=name)
