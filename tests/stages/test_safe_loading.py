"""Loading never runs code the user did not ask for: weights only from safetensors, optimizer and trainer
state through torch.load(weights_only=True), a teacher's own Python code only with
teacher.trust_remote_code=true."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil

import pytest
import torch

from pipeline.stages.common import StageError, load_model
from pipeline.train.state import load_weights_and_optimizer, read_trainer_state, save_state
from tests.stages.conftest import tiny_config


class RunsCode:
    """A pickle payload that creates a file when unpickled (what a malicious checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_refused(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    marker = tmp_path / "code-ran"
    (teacher / "model.safetensors").unlink()
    with open(teacher / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": RunsCode(str(marker))}, handle)
    with pytest.raises(StageError, match=r"has only pytorch_model.bin: weights are loaded only from safetensors") as error:
        load_model(teacher, tiny_config(), "teacher")
    assert "\n" not in str(error.value) and not marker.exists()


def test_code_in_the_teacher_folder_runs_only_when_trusted(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    marker = tmp_path / "code-ran"
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (teacher / "config.json").write_text(json.dumps(config))
    (teacher / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(StageError, match=r"needs Python code from its own folder .* teacher.trust_remote_code=true"):
        load_model(teacher, tiny_config(), "teacher")
    assert not marker.exists()

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, trust_remote_code=True))
    with pytest.raises(Exception):  # the module defines no model class, but it was imported: the user's choice
        load_model(teacher, cfg, "teacher")
    assert marker.exists()


def test_training_state_loads_tensors_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = save_state(tmp_path / "state", step=1, model=model, optimizer=optimizer, trainer={"step": 1})
    assert read_trainer_state(state)["step"] == 1

    marker = tmp_path / "code-ran"
    for name in ("trainer.pt", "optimizer.pt"):
        torch.save({"format_version": 1, "step": RunsCode(str(marker))}, state / name)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_trainer_state(state)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_weights_and_optimizer(state, model=model, optimizer=optimizer)
    assert not marker.exists()
