"""Training under torchrun on CPU (gloo): the stages' launcher and worker, FSDP2, DCP resume, failures.

Every torchrun launch here costs seconds (each rank imports torch and transformers), so the launches are
few: one run resumed twice (2 -> 1 -> 2 processes) covers both process counts and both directions of a
resharded resume; its loss curve is compared with the plain single-process loop's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig, HardwareConfig
from pipeline.convert import hybridize
from pipeline.data.demo import DemoDataConfig
from pipeline.stages.common import StageData, StageError, load_model, load_tokenizer
from pipeline.stages.launch import TrainingJob, run_torchrun, torchrun_command, train_under_torchrun
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
    """Steps 1-2 on two processes, step 3 on one (a 2 -> 1 resume), step 4 on two (1 -> 2)."""
    folder, teacher_dir, data, cfg, tokenizer, student, reference, plain = setup
    state_dir, reporter = folder / "state", Collecting()
    job = TrainingJob(train=cfg, data=data, batches="distill", state_dir=str(state_dir), precision="fp32", device="cpu",
                      teacher_dir=str(teacher_dir))
    for nproc, max_steps, done in ((2, 2, 2), (1, 1, 3), (2, None, 4)):
        job.max_steps = max_steps
        result = train_under_torchrun(student, tokenizer, job, hardware=HardwareConfig(device="cpu", nproc=nproc),
                                      work_dir=folder / "work", reporter=reporter, label="H-1")
        assert (result.steps_done, result.completed) == (done, done == cfg.steps)
        assert result.state_path == state_dir / f"dcp-step-{done:08d}"
    assert sorted(reporter.losses) == [1, 2, 3, 4]  # rank 0's curve streamed into the reporter, once per step
    assert any("H-1 step 4: loss" in line for line in reporter.lines)
    for step, loss in plain.items():
        assert reporter.losses[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    # the weights gathered on rank 0 were loaded into the stage's student
    for (name, trained), (_, expected) in zip(student.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(trained, expected, rtol=1e-3, atol=1e-4, msg=name)


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
