"""Loading never runs code from a checkpoint: weights only from safetensors, optimizer and trainer state
through torch.load(weights_only=True), a folder's own Python code never (our self-contained exports load
through the classes installed here)."""

from __future__ import annotations

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
        load_model(teacher, tiny_config().hardware, "teacher")
    assert "\n" not in str(error.value) and not marker.exists()


def test_code_in_the_teacher_folder_never_runs(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    marker = tmp_path / "code-ran"
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (teacher / "config.json").write_text(json.dumps(config))
    (teacher / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(StageError, match=r"needs Python code from its own folder .* is never run") as error:
        load_model(teacher, tiny_config().hardware, "teacher")
    assert "\n" not in str(error.value) and not marker.exists()


def test_a_self_contained_hybrid_loads_without_running_its_files(tiny_teacher, tmp_path):
    from pipeline.convert import hybridize
    from pipeline.model import HybridForCausalLM

    hybrid = hybridize(load_model(tiny_teacher, tiny_config().hardware), [1], dt_rank=2)
    hybrid.save_pretrained(tmp_path / "export", self_contained=True)  # modeling code + auto_map
    marker = tmp_path / "code-ran"
    for code in (tmp_path / "export").glob("*.py"):  # were any of them imported, the marker would appear
        code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    loaded = load_model(tmp_path / "export", tiny_config().hardware)
    assert isinstance(loaded, HybridForCausalLM) and not marker.exists()


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


# ----------------------------------------------------------------------------------------------------
# teachers whose weights do not fit: refused in one line, never loaded with random weights in their place


def edited_teacher(tiny_teacher, tmp_path, edit) -> object:
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = load_file(teacher / "model.safetensors")
    edit(weights)
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    return teacher


def test_weights_with_wrong_shapes_are_refused(tiny_teacher, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight"
    teacher = edited_teacher(tiny_teacher, tmp_path, lambda w: w.update({key: w[key][:, :16].contiguous()}))
    with pytest.raises(StageError, match=rf"1 weights have other shapes .*{key} \(32, 16\) vs \(32, 32\)") as error:
        load_model(teacher, tiny_config().hardware, "teacher")
    assert "\n" not in str(error.value)


def test_missing_weights_are_refused(tiny_teacher, tmp_path):
    key = "model.layers.2.mlp.down_proj.weight"
    teacher = edited_teacher(tiny_teacher, tmp_path, lambda w: w.pop(key))
    with pytest.raises(StageError, match=rf"1 weights its config.json needs are not in .*{key}.*incomplete"):
        load_model(teacher, tiny_config().hardware, "teacher")


def test_truncated_teacher_is_refused(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    data = (teacher / "model.safetensors").read_bytes()
    (teacher / "model.safetensors").write_bytes(data[: len(data) // 2])  # a download or copy cut short
    with pytest.raises(StageError, match=r"cannot be loaded \(SafetensorError: .*\); the files are truncated") as error:
        load_model(teacher, tiny_config().hardware, "teacher")
    assert "\n" not in str(error.value)
