"""The MMR stage's trials fanned out over worker processes (hardware.nproc = 2, CPU): the same scores as the
sequential path, resume from a partial record, a dying worker named in one line.

Each fan-out spawns two processes that import torch and transformers (seconds each), so there are two:
one resumes a partial record with two initialisations a candidate (five trials over the two workers, draw
0 of each compared with the sequential scores) and one has a worker killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal

import pytest

from pipeline.convert import hybridize
from pipeline.stages import StageError, run_mmr
from pipeline.stages.common import load_model, load_tokenizer
from pipeline.stages.mmr import MMR_FILE, TRIALS_FILE

from tests.stages.conftest import RecordingReporter, tiny_config

# Measured: equal to the sequential scores to the last bit on CPU (2 cores, each worker on 1 thread; every
# worker runs the same trial with the same seed and batches); the tolerance only allows float32 noise from
# another thread count on another machine.
SCORE_RTOL = 1e-5


def score(cfg, teacher, parent, out_dir, work_dir, reporter):
    return run_mmr(cfg.mmr, cfg.data.view(cfg.data.distill_on), cfg.hardware, cfg.seed, teacher=teacher,
                   parent=parent, out_dir=out_dir, work_dir=work_dir, reporter=reporter)


@pytest.fixture(scope="module")
def parent(tiny_teacher, tmp_path_factory):
    """H-1 of the tiny teacher (layer 0 Mamba): three attention layers to score."""
    folder = tmp_path_factory.mktemp("H-1")
    cfg = tiny_config()
    hybridize(load_model(tiny_teacher, cfg.hardware, "teacher", fp32=True), [0], seed=0).save_pretrained(folder)
    load_tokenizer(tiny_teacher).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sequential(tiny_teacher, parent, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sequential")
    result = score(tiny_config(), tiny_teacher, parent, folder / "mmr", folder / "work", RecordingReporter())
    return {entry["layer"]: entry["loss"] for entry in result["ranking"]}


def fanned_out(workers: int = 2, seeds: int = 1):
    cfg = tiny_config()
    return dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, nproc=workers),
                               mmr=dataclasses.replace(cfg.mmr, seeds=seeds))


def test_two_workers_resume_a_partial_record_with_the_sequential_scores(tiny_teacher, parent, sequential, tmp_path):
    """Two initialisations a candidate: draw 0 is the sequential (one-seed) trial, whichever worker runs it;
    the draws of one layer may finish in any order."""
    assert sorted(sequential) == [1, 2, 3]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / TRIALS_FILE).write_text(json.dumps({1: {0: sequential[1]}}))  # a killed stage's record
    reporter = RecordingReporter()
    result = score(fanned_out(seeds=2), tiny_teacher, parent, tmp_path / "mmr", tmp_path / "work", reporter)
    assert "  mmr layer 1: 1 of 2 initialisations recorded" in reporter.lines
    assert any("5 trials on 2 worker processes" in line for line in reporter.lines)
    started = {re.search(r"mmr worker (\d)", line).group(1) for line in reporter.lines if ", pid " in line}
    assert started == {"0", "1"}  # trials on each worker
    # the trials that ran have their curves under the train/... keys, each in its own reporter
    assert sorted(reporter.trials) == ["layer-1-init-1", "layer-2", "layer-2-init-1", "layer-3", "layer-3-init-1"]
    for trial in reporter.trials.values():
        assert [step for step, _ in trial.metrics] == [1, 2, 3]
        assert {"train/loss", "train/kl", "train/lr"} <= set(trial.metrics[-1][1])
    draws = {entry["layer"]: entry["losses"] for entry in result["ranking"]}
    assert draws.keys() == sequential.keys()
    for layer, loss in sequential.items():
        assert draws[layer][0] == pytest.approx(loss, rel=SCORE_RTOL), layer
        assert len(draws[layer]) == 2 and draws[layer][1] != draws[layer][0]
    means = {entry["layer"]: entry["loss"] for entry in result["ranking"]}
    assert [e["layer"] for e in result["ranking"]] == sorted(means, key=lambda k: (means[k], k))
    assert json.loads((tmp_path / "mmr" / MMR_FILE).read_text())["ranking"] == result["ranking"]
    recorded = json.loads((tmp_path / "work" / TRIALS_FILE).read_text())
    assert {layer: sorted(d) for layer, d in recorded.items()} == {"1": ["0", "1"], "2": ["0", "1"], "3": ["0", "1"]}


class KillingReporter(RecordingReporter):
    """SIGKILLs (as the OOM killer does) the worker that announces the first trial, and remembers which."""

    killed: tuple[str, str] | None = None

    def progress(self, message):
        super().progress(message)
        found = re.search(r"mmr layer (\d+): mmr worker (\d+) \(cpu\), pid (\d+)", message)
        if found and self.killed is None:
            self.killed = (found.group(2), found.group(1))
            os.kill(int(found.group(3)), signal.SIGKILL)


def test_a_killed_worker_fails_the_stage_in_one_line(tiny_teacher, parent, tmp_path):
    reporter = KillingReporter()
    with pytest.raises(StageError) as failure:
        score(fanned_out(), tiny_teacher, parent, tmp_path / "mmr", tmp_path / "work", reporter)
    worker, layer = reporter.killed
    assert str(failure.value) == f"mmr worker {worker} (cpu) was killed by signal SIGKILL during layer {layer}"
    assert not (tmp_path / "mmr" / MMR_FILE).exists()
    recorded = tmp_path / "work" / TRIALS_FILE  # what the other worker finished, if anything, is kept whole
    if recorded.exists():
        assert layer not in json.loads(recorded.read_text())


def test_workers_score_layer_mixer_pairs_as_the_sequential_path(tiny_teacher, parent, sequential, tmp_path):
    """Gated DeltaNet trials fan out too: the Mamba trials' scores are the sequential ones, the pairs are all
    there (two recorded beforehand, so the workers run one Mamba and two Gated DeltaNet trials)."""
    from pipeline.config import GDNConfig

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / TRIALS_FILE).write_text(json.dumps({"1": {"0": sequential[1]}, "2": {"0": sequential[2]}}))
    cfg, reporter = fanned_out(), RecordingReporter()
    result = run_mmr(cfg.mmr, cfg.data.view(cfg.data.distill_on), cfg.hardware, cfg.seed, ["mamba", "gdn"],
                     GDNConfig(), teacher=tiny_teacher, parent=parent, out_dir=tmp_path / "mmr",
                     work_dir=tmp_path / "work", reporter=reporter)
    pairs = {(entry["layer"], entry["mixer"]): entry["loss"] for entry in result["ranking"]}
    assert sorted(pairs) == [(layer, mixer) for layer in (1, 2, 3) for mixer in ("gdn", "mamba")]
    assert pairs[(3, "mamba")] == pytest.approx(sequential[3], rel=SCORE_RTOL)
    assert sorted(reporter.trials) == ["layer-1-gdn", "layer-2-gdn", "layer-3", "layer-3-gdn"]
    assert json.loads((tmp_path / "mmr" / MMR_FILE).read_text())["mixers"] == ["mamba", "gdn"]
