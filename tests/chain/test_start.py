"""start.path: continue the progressive conversion of a released hybrid (here one exported in the Apriel-H1
layout by `python -m pipeline.export`), and the plan's one-line refusals of a start that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.chain import local_teacher_source, run_local
from pipeline.config import ScheduleConfig, StartConfig, TeacherConfig
from pipeline.convert import hybridize
from pipeline.export import main as export_main
from pipeline.model.config import ATTENTION, MAMBA
from pipeline.model.layouts import APRIEL_H1, MAMBAINLLAMA, detect_layout, load_pretrained, native_state
from pipeline.plan import plan
from pipeline.store import LocalStore

from tests.stages.conftest import tiny_config
from tests.teachers import save_tiny_teacher

START_MAMBA = [1, 2]  # the released hybrid's Mamba layers (of 4)


def save_hybrid(teacher: Path, layers: list[int], folder: Path) -> Path:
    """`teacher` with `layers` MIL-converted, saved in our layout with the teacher's tokenizer."""
    from pipeline.data import load_tokenizer

    hybridize(load_pretrained(teacher), layers, dt_rank=2).save_pretrained(folder)
    load_tokenizer(teacher).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def released(teacher, tmp_path_factory) -> Path:
    """A tiny hybrid of the teacher (layers 1 and 2 Mamba) exported in the Apriel-H1 layout."""
    root = tmp_path_factory.mktemp("released")
    ours = save_hybrid(teacher, START_MAMBA, root / "ours")
    assert export_main([str(ours), str(root / "apriel-h2"), "--format", APRIEL_H1]) == 0
    assert detect_layout(root / "apriel-h2") == APRIEL_H1
    return root / "apriel-h2"


def config(tmp_path: Path, teacher: Path, start: Path | None, counts: list[int]):
    cfg = tiny_config(teacher=TeacherConfig(path=str(teacher)), schedule=ScheduleConfig(counts=counts),
                      start=StartConfig(path=None if start is None else str(start)))
    cfg.storage.uri, cfg.storage.cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    return cfg


def kinds(folder: Path) -> list[str]:
    return json.loads((folder / "config.json").read_text())["layer_types"]


def test_the_chain_continues_a_released_hybrid_from_its_pattern(teacher, released, tmp_path):
    cfg = config(tmp_path, teacher, released, [3])
    folders = run_local(cfg)
    assert set(folders) == {"teacher", "start", "mmr-start", "H-3", "H-3-SFT", "evaluate"}
    assert "loo" not in folders  # the start replaces LOO and the first conversion

    # The start, registered in our layout, holds the released weights unchanged.
    start = folders["start"]
    assert [i for i, kind in enumerate(kinds(start)) if kind == MAMBA] == START_MAMBA
    original, registered = native_state(load_pretrained(released)), native_state(load_pretrained(start))
    assert original.keys() == registered.keys() and all(torch.equal(original[k], registered[k]) for k in original)
    manifest = json.loads((start / "manifest.json").read_text())
    assert manifest["parent"]["uri"] == Path(released).resolve().as_uri()  # where it came from, not the teacher

    # MMR scored only the start's attention layers; the step turned the easiest of them, and the start's
    # Mamba layers stayed Mamba.
    ranking = json.loads((folders["mmr-start"] / "mmr.json").read_text())["ranking"]
    assert [entry["layer"] for entry in ranking] in ([0, 3], [3, 0])
    h3 = json.loads((folders["H-3"] / "stage.json").read_text())
    assert h3["parent"] == "start" and h3["converted_layers"] == [ranking[0]["layer"]]
    pattern = kinds(folders["H-3"])
    assert [i for i, kind in enumerate(pattern) if kind == MAMBA] == sorted([*START_MAMBA, ranking[0]["layer"]])
    assert pattern.count(ATTENTION) == 1

    # The evaluation reports the start under its own name beside the new checkpoints.
    summary = json.loads((folders["evaluate"] / "summary.json").read_text())
    assert [record["checkpoint"] for record in summary] == ["teacher", "start", "H-3", "H-3-SFT"]
    by_name = {record["checkpoint"]: record for record in summary}
    assert by_name["start"]["layer_pattern"] == "AMMA" and by_name["start"]["n_mamba"] == 2
    assert by_name["H-3"]["n_mamba"] == by_name["H-3-SFT"]["n_mamba"] == 3
    assert by_name["H-3"]["parent"] == "start"


def test_a_hybrid_teacher_keeps_its_mamba_layers_through_loo_and_the_first_conversion(teacher, released, tmp_path):
    cfg = config(tmp_path, released, None, [3])  # the released hybrid as the teacher itself
    folders = run_local(cfg, until="convert")
    manifest = json.loads((folders["teacher"] / "manifest.json").read_text())
    assert (manifest["metadata"]["layer_pattern"], manifest["metadata"]["n_mamba"]) == ("AMMA", 2)
    loo = json.loads((folders["loo"] / "loo.json").read_text())
    assert [entry["layer"] for entry in loo["layers"]] == [0, 3]  # only attention layers are scored
    assert loo["mamba_layers"] == START_MAMBA and set(loo["ranking"]) == {0, 3}
    converted = json.loads((folders["H-3"] / "stage.json").read_text())["converted_layers"]
    assert len(converted) == 1 and converted[0] == loo["ranking"][0]
    pattern = kinds(folders["H-3"])
    assert pattern.count(MAMBA) == 3 and all(pattern[i] == MAMBA for i in START_MAMBA)


# --- the plan: one line per start that cannot work, before anything runs ------------------------------

def plan_problems(tmp_path: Path, teacher: Path, start: Path | None, counts: list[int]):
    cfg = config(tmp_path, teacher, start, counts)
    store_root = tmp_path / "store" / cfg.run_name
    result = plan(cfg, store=LocalStore(store_root, tmp_path / "cache" / "store"),
                  work_root=tmp_path / "cache" / "work",
                  teacher=lambda: local_teacher_source(str(teacher)),
                  start=lambda: local_teacher_source(str(start), "start.path"))
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()  # the plan writes nothing
    return result


def test_the_plan_of_a_good_start_lists_its_stages(teacher, released, tmp_path):
    result = plan_problems(tmp_path, teacher, released, [3, 4])
    assert result.problems == []
    assert [(row.stage, row.name) for row in result.rows] == [
        ("teacher", "teacher"), ("start", "start"), ("mmr", "mmr-start"), ("step", "H-3"), ("mmr", "mmr-H-3"),
        ("step", "H-4"), ("sft", "H-4-SFT"), ("evaluate", "evaluate")]
    assert result.rows[0].status == "run" and len(result.rows[0].key) == 64
    assert result.rows[1].inputs == [str(released), "teacher"]  # checked against the teacher: pending on it


@pytest.fixture(scope="module")
def wider(teacher, tmp_path_factory) -> Path:
    """A hybrid of another teacher (hidden size 64, 4 layers) in the MambaInLlama layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data import build_char_tokenizer

    root = tmp_path_factory.mktemp("wider")
    tokenizer = build_char_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    ours = save_hybrid(root / "teacher", [1], root / "ours")
    assert export_main([str(ours), str(root / "mil"), "--format", MAMBAINLLAMA]) == 0
    return root / "mil"


@pytest.mark.parametrize(("start", "counts", "culprit"), [
    ("released", [2, 3], "schedule.counts [2, 3]: start.path={start} already has 2 Mamba layers; every count must "
                         "be larger"),
    ("wider", [3], "start.path={start} does not fit the teacher: hidden_size 64 vs the teacher's 32"),
    ("teacher", [3], "start.path={start} is not a hybrid (no Mamba layer; layout transformers)"),
    ("missing", [3], "start.path='{start}' does not exist (a folder with config.json, weights and tokenizer, "
                     "or a hub id org/name[@revision])"),
])
def test_a_start_that_cannot_work_is_one_line_in_the_plan(teacher, released, wider, tmp_path, start, counts, culprit):
    folder = {"released": released, "wider": wider, "teacher": teacher, "missing": tmp_path / "nope"}[start]
    result = plan_problems(tmp_path, teacher, folder, counts)
    assert len(result.problems) == 1, result.problems
    (problem,) = result.problems
    assert "\n" not in problem and problem.startswith(culprit.format(start=folder)), problem
    with pytest.raises(ValueError, match="start.path"):
        result.raise_problems()


def test_a_hybrid_teacher_with_a_count_it_already_has_is_one_line_in_the_plan(released, tmp_path):
    (problem,) = plan_problems(tmp_path, released, None, [2, 3]).problems
    assert problem == (f"schedule.counts [2, 3]: teacher.path={released} already has 2 Mamba layers; every count "
                       "must be larger (or give it as start.path to continue its conversion)")


def test_without_the_plan_the_stages_refuse_a_start_that_cannot_work(teacher, released, wider, tmp_path):
    """run_local runs no plan: the start stage and the chain still stop before any training."""
    from pipeline.config import ConfigError, HardwareConfig
    from pipeline.stages import StageError, import_start

    for source, culprit in ((teacher, "is not a hybrid (no Mamba layer)"),
                            (wider, "does not fit the teacher: hidden_size 64 vs the teacher's 32")):
        with pytest.raises(StageError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
            import_start(HardwareConfig(device="cpu"), source=source, teacher=teacher, out_dir=tmp_path / "out",
                         work_dir=tmp_path / "work")
    with pytest.raises(ConfigError, match=r"start.path=.* already has 2 Mamba layers; every count must be larger"):
        run_local(config(tmp_path, teacher, released, [2, 4]))
    assert sorted(path.name for path in (tmp_path / "store" / "test").iterdir() if not path.name.startswith(".")) == [
        "start", "teacher"]
