"""Released-hybrid layouts in the chain: an Apriel-H1 or MambaInLlama folder as the teacher, and evaluated
beside our own checkpoints."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.convert import hybridize
from pipeline.model import HybridForCausalLM
from pipeline.model.layouts import APRIEL_H1, MAMBAINLLAMA, load_pretrained, native_state, write_layout
from pipeline.plan import teacher_shape
from pipeline.executor import local_source
from pipeline.stages import run_evaluate
from pipeline.stages.common import load_model

from tests.stages.conftest import RecordingReporter, tiny_config


@pytest.fixture(scope="module")
def released(tiny_teacher, tmp_path_factory):
    """The tiny teacher with layers 1 and 2 turned to Mamba, written in both released layouts."""
    hybrid = hybridize(load_pretrained(tiny_teacher), [1, 2], dt_rank=2)
    root = tmp_path_factory.mktemp("released")
    for layout in (APRIEL_H1, MAMBAINLLAMA):
        write_layout(hybrid, root / layout, layout, side_files_from=tiny_teacher)
    return hybrid, root


@pytest.mark.parametrize("layout", [APRIEL_H1, MAMBAINLLAMA])
def test_teacher_path_may_point_at_a_released_hybrid(released, layout):
    hybrid, root = released
    cfg = tiny_config(teacher=TeacherConfig(path=str(root / layout)))
    problems: list[str] = []
    shape = teacher_shape(cfg, local_source(str(root / layout), root / layout), problems)
    assert problems == [] and shape["num_hidden_layers"] == hybrid.config.num_hidden_layers
    loaded = load_model(root / layout, cfg.hardware, "teacher")  # what every stage does with teacher.path
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.layer_pattern == "AMMA"
    ours, theirs = native_state(hybrid), native_state(loaded)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_released_hybrid_is_evaluated_beside_ours(released, tiny_teacher, tmp_path):
    hybrid, root = released
    hybrid.save_pretrained(tmp_path / "ours")
    cfg = tiny_config()
    records = run_evaluate(cfg.evaluate, cfg.data, cfg.hardware, teacher=tiny_teacher,
                           checkpoints={"ours": tmp_path / "ours", "apriel": root / APRIEL_H1},
                           out_dir=tmp_path / "evaluate", work_dir=tmp_path / "work", reporter=RecordingReporter())
    by_name = {record["checkpoint"]: record for record in records}
    assert by_name["apriel"]["n_mamba"] == by_name["ours"]["n_mamba"] == 2
    # The same weights in another layout: the same quality figures.
    for metric in ("answer_accuracy", "nll", "kl_to_teacher"):
        assert by_name["apriel"][metric] == pytest.approx(by_name["ours"][metric], abs=1e-6)
