"""A tiny saved teacher (random Llama + the demo char tokenizer) and a tiny run config for stage tests."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from pipeline.config import (
    DataConfig,
    EvaluateConfig,
    LOOConfig,
    MMRConfig,
    RunConfig,
    ScheduleConfig,
    SFTConfig,
    TeacherConfig,
)
from pipeline.data import DemoDataConfig, DemoTeacherConfig
from pipeline.train import TrainConfig

TINY_DATA = DemoDataConfig(n_train=256, n_validation=32, n_test=32, n_text_train=256, n_text_validation=32,
                           n_text_test=32)


def tiny_config(**changes) -> RunConfig:
    cfg = RunConfig(
        run_name="test",
        teacher=TeacherConfig(demo=DemoTeacherConfig(
            num_hidden_layers=4, hidden_size=32, intermediate_size=64,
            train=TrainConfig(steps=8, lr=3e-3, warmup_steps=2, batch_size=16, max_length=96, trainable="all",
                              loss="ce", save_every=4, log_every=1))),
        data=DataConfig(demo=TINY_DATA, max_length=96),
        schedule=ScheduleConfig(counts=[2, 3]),
        loo=LOOConfig(metric="nll", num_examples=8),
        train=TrainConfig(steps=6, lr=3e-3, warmup_steps=1, batch_size=8, max_length=96, trainable="all",
                          save_every=2, log_every=1),
        mmr=MMRConfig(train=TrainConfig(steps=3, lr=2e-3, batch_size=8, max_length=96, trainable="mamba",
                                        loss_window=2, log_every=1)),
        sft=SFTConfig(train=TrainConfig(steps=3, lr=1e-3, warmup_steps=1, batch_size=8, max_length=96,
                                        trainable="all", loss="ce", save_every=2, log_every=1)),
        evaluate=EvaluateConfig(num_examples=8, batch_size=8, max_new_tokens=48, nll_examples=8, throughput_batch=2,
                                throughput_prompt=8, throughput_new_tokens=4, throughput_repeats=1),
    )
    return dataclasses.replace(cfg, **changes) if changes else cfg


class RecordingReporter:
    """Keeps what a stage reports (metrics with steps, artifacts, progress lines)."""

    def __init__(self, fail_at_metric: int | None = None) -> None:
        self.metrics: list[tuple[int | None, dict]] = []
        self.artifacts: list[str] = []
        self.lines: list[str] = []
        self.trials: dict[str, RecordingReporter] = {}
        self.root, self.logged = self, 0
        self.fail_at_metric = fail_at_metric

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))
        self.root.logged += 1  # trials' metrics count too: the kill comes at the n-th metric of the stage
        if self.root.fail_at_metric is not None and self.root.logged >= self.root.fail_at_metric:
            raise KeyboardInterrupt("simulated kill")

    def log_artifact(self, path):
        self.artifacts.append(str(path))

    def progress(self, message):
        self.lines.append(message)

    @contextlib.contextmanager
    def trial(self, name):
        """A trial's metrics go to a reporter of its own, kept in `trials` by name."""
        child = RecordingReporter()
        child.root = self.root
        self.trials[name] = child
        yield child


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 4-layer random Llama (GQA) saved with the demo tokenizer: a stand-in for any user teacher."""
    from tests.teachers import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))
