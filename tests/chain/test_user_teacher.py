"""A user's teacher through the chain: fine-tuned first (teacher.finetune), sampled for generic text
(data.generic=teacher), every later stage reading the fine-tuned teacher."""

from __future__ import annotations

import dataclasses
import json

from pipeline.chain import run_local
from pipeline.config import SamplesConfig, TeacherConfig, TeacherFinetuneConfig, TrainConfig

from tests.chain.test_run_local import counting
from tests.stages.conftest import tiny_config
from tests.teachers import save_tiny_teacher


def _config(tmp_path, **finetune):
    teacher = save_tiny_teacher(tmp_path / "user-teacher")
    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg, teacher=TeacherConfig(path=str(teacher), finetune=TeacherFinetuneConfig(enabled=True, train=TrainConfig(
            steps=3, lr=1e-3, batch_size=8, max_length=96, trainable="all", loss="ce", save_every=0, log_every=1,
            **finetune))),
        data=dataclasses.replace(cfg.data, generic="teacher", samples=SamplesConfig(validation=2, test=4,
                                                                                    max_new_tokens=8)))
    cfg.storage.uri, cfg.storage.cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    return cfg


def test_fine_tuned_teacher_and_its_samples_feed_the_chain(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    calls = counting(monkeypatch, ["import_teacher", "run_teacher_finetune", "run_samples", "run_loo", "run_evaluate"])
    folders = run_local(cfg)
    assert calls == ["import_teacher", "run_teacher_finetune", "run_samples", "run_loo", "run_evaluate"]
    store = tmp_path / "store" / "test"
    tuned = json.loads((store / "teacher-ft" / "stage.json").read_text())
    assert tuned["stage"] == "teacher_finetune" and tuned["checkpoint"] == "teacher" and tuned["steps"] == 3
    assert tuned["layers"] == 4 and tuned["cumulative_train_tokens"] > 0
    # every later stage reads the fine-tuned teacher, not the imported one
    for name in ("loo", "H-2", "teacher-samples"):
        parent = json.loads((store / name / "manifest.json").read_text())["parent"]
        assert (parent["name"] if isinstance(parent, dict) else parent) == "teacher-ft", (name, parent)
    rows = [json.loads(line) for line in (folders["teacher-samples"] / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["text"].startswith(row["opening"]) for row in rows)
    summary = json.loads((store / "evaluate" / "summary.json").read_text())
    assert [record["checkpoint"] for record in summary] == ["teacher", "H-2", "H-3", "H-3-SFT"]
    assert all(record["nll_generic"] > 0 for record in summary)
    assert summary[0]["kl_generic"] == 0 and all(record["kl_generic"] > 0 for record in summary[1:])

    calls.clear()
    run_local(cfg)
    assert calls == []  # nothing changed: nothing runs
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, finetune=dataclasses.replace(cfg.teacher.finetune, train=dataclasses.replace(
            cfg.teacher.finetune.train, steps=4))))
    run_local(cfg, until="loo")
    assert calls == ["run_teacher_finetune", "run_samples", "run_loo"]  # the import is kept, the rest follow


def test_a_user_teacher_on_the_demo_settings_is_refused_by_the_plan(tmp_path):
    from pipeline.chain import local_teacher_source
    from pipeline.config import RunConfig
    from pipeline.plan import plan
    from pipeline.store import open_store

    teacher = save_tiny_teacher(tmp_path / "user-teacher")
    cfg = RunConfig(teacher=TeacherConfig(path=str(teacher)), schedule=tiny_config().schedule)
    checked = plan(cfg, store=open_store(str(tmp_path / "store")), work_root=tmp_path / "work",
                   teacher=lambda: local_teacher_source(cfg.teacher.path), until="teacher")
    assert [p for p in checked.problems if "demo's settings" in p] == [
        "teacher.path is your teacher, but train, mmr.train, sft.train are the demo's settings (calibrated for a "
        "1M-parameter model trained here from scratch; lr 2e-3 diverges on a pretrained model): use "
        "teacher=local, which selects the settings for pretrained models (RunConfig.with_pretrained_settings() in "
        "Python), or set them"]
    fixed = plan(cfg.with_pretrained_settings(), store=open_store(str(tmp_path / "store")),
                 work_root=tmp_path / "work", teacher=lambda: local_teacher_source(cfg.teacher.path), until="teacher")
    assert not [p for p in fixed.problems if "demo's settings" in p]


def test_a_missing_gguf_teacher_names_both_forms(tmp_path):
    import pytest

    from pipeline.chain import local_teacher_source
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"does not exist \(a folder with config.json, weights and tokenizer, "
                                          r"or a .gguf file, or a hub id org/name\[@revision\]\)"):
        local_teacher_source(str(tmp_path / "model.gguf"))
