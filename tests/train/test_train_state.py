"""Training-state saves interrupted at every file-system step: the last committed state always loads, whole,
and the state that loads never goes back once the new one is committed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import pipeline.train.state as state
from pipeline.train.state import latest_state, load_weights_and_optimizer, read_trainer_state, save_state


class Interrupted(Exception):
    """Stands for a kill: raised from inside save_state, nothing after it runs."""


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(seed + 1):  # a different number of steps per seed, so the optimizer states differ too
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


# the calls save_state makes on the file system, each a point where a kill can land (before or after it)
_PATCHED: list[tuple[object, str]] = [
    (state, "save_model"), (torch, "save"), (os, "fsync"), (os, "replace"), (os, "mkdir"), (shutil, "rmtree"),
]


def _save_interrupted(monkeypatch, root: Path, step: int, seed: int, tag: str, *, at: int | None, after: bool) -> int:
    """save_state of model `seed` at `step`, raising Interrupted at the `at`-th patched call (None: never).
    Returns how many patched calls were made."""
    model, optimizer = _model_and_optimizer(seed)
    calls = 0

    def wrap(real: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            nonlocal calls
            calls += 1
            number = calls
            if number == at and not after:
                raise Interrupted
            try:
                return real(*args, **kwargs)
            finally:  # also after a call that raised (os.mkdir of a folder that exists)
                if number == at and after:
                    raise Interrupted  # noqa: B012

        return wrapper

    with monkeypatch.context() as patch:
        for owner, name in _PATCHED:
            patch.setattr(owner, name, wrap(getattr(owner, name)))
        try:
            save_state(root, step=step, model=model, optimizer=optimizer, trainer={"step": step, "tag": tag})
        except Interrupted:
            pass
    return calls


def _loaded(root: Path) -> tuple[int, str]:
    """(step, tag) of the state that resumes, after checking that its weights and optimizer state are whole."""
    path = latest_state(root)
    assert path is not None, f"no state loads from {sorted(p.name for p in root.iterdir())}"
    trainer = read_trainer_state(path)
    seed = {"old": 0, "new": 1}[trainer["tag"]]
    expected_model, expected_optimizer = _model_and_optimizer(seed)
    model, optimizer = _model_and_optimizer(2)  # other weights, overwritten by the load
    load_weights_and_optimizer(path, model=model, optimizer=optimizer)
    for (name, got), want in zip(model.state_dict().items(), expected_model.state_dict().values()):
        assert torch.equal(got, want), f"{path.name}: {name} is not what was saved"
    got_states = optimizer.state_dict()["state"]
    for index, want in expected_optimizer.state_dict()["state"].items():
        assert torch.equal(got_states[index]["exp_avg"], want["exp_avg"])
        assert torch.equal(got_states[index]["step"], want["step"])
    return trainer["step"], trainer["tag"]


def _committed(root: Path) -> tuple[int, str]:
    """(step, tag) of the state that resumes, which must be the one LATEST names (not a fallback)."""
    assert (root / "LATEST").read_text() == f"{latest_state(root).name}\n"
    return _loaded(root)


@pytest.mark.parametrize("old_step, new_step", [(4, 8), (8, 8)], ids=["next step", "same step again"])
def test_a_save_interrupted_anywhere_leaves_the_last_committed_state(monkeypatch, tmp_path, old_step, new_step):
    points = _save_interrupted(monkeypatch, tmp_path / "count", new_step, 1, "new", at=None, after=False)
    assert points >= 12  # mkdirs, 3 file writes, fsyncs, 2 renames, removals of the old state
    outcomes = []
    for at in range(1, points + 1):
        for after in (False, True):
            root = tmp_path / f"at-{at}-{'after' if after else 'before'}"
            save_state(root, step=old_step, model=_model_and_optimizer(0)[0], optimizer=_model_and_optimizer(0)[1],
                       trainer={"step": old_step, "tag": "old"})
            _save_interrupted(monkeypatch, root, new_step, 1, "new", at=at, after=after)
            outcomes.append(_committed(root))

            # the next save cleans up whatever the interrupted one left, and commits
            save_state(root, step=new_step + 4, model=_model_and_optimizer(1)[0],
                       optimizer=_model_and_optimizer(1)[1], trainer={"step": new_step + 4, "tag": "new"})
            assert _committed(root) == (new_step + 4, "new")
            assert sorted(path.name for path in root.iterdir() if not path.name.startswith(".LATEST")) == [
                "LATEST", f"step-{new_step + 4:08d}"]
    # one switch point: the old state up to the commit, the new one from then on, never back
    switch = outcomes.index((new_step, "new"))
    assert 0 < switch < len(outcomes) - 1
    assert outcomes == [(old_step, "old")] * switch + [(new_step, "new")] * (len(outcomes) - switch)


def test_a_state_named_by_no_pointer_is_not_resumed(tmp_path):
    """A complete state renamed into place whose commit never happened is ignored while LATEST names another."""
    model, optimizer = _model_and_optimizer(0)
    save_state(tmp_path, step=4, model=model, optimizer=optimizer, trainer={"step": 4, "tag": "old"})
    shutil.copytree(tmp_path / "step-00000004", tmp_path / "step-00000008")  # as if killed before the commit
    assert latest_state(tmp_path).name == "step-00000004"


def test_without_a_pointer_the_newest_complete_state_resumes(tmp_path):
    """State directories from before LATEST existed: the newest complete one; a partly removed one is skipped."""
    model, optimizer = _model_and_optimizer(0)
    save_state(tmp_path, step=4, model=model, optimizer=optimizer, trainer={"step": 4, "tag": "old"})
    (tmp_path / "LATEST").unlink()
    shutil.copytree(tmp_path / "step-00000004", tmp_path / "step-00000012")
    (tmp_path / "step-00000012" / "optimizer.pt").unlink()  # a removal cut short
    (tmp_path / ".step-00000016.tmp").mkdir()  # a write cut short
    assert latest_state(tmp_path).name == "step-00000004"
    assert _loaded(tmp_path) == (4, "old")


FULL_DISK_SCRIPT = """
import resource, signal, sys, torch
from pipeline.train.state import StateSaveError, latest_state, save_state

root = sys.argv[1]
model = torch.nn.Linear(200, 200)
optimizer = torch.optim.AdamW(model.parameters())
save_state(root, step=1, model=model, optimizer=optimizer, trainer={"step": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # the disk refuses to grow a file past 50 kB
try:
    save_state(root, step=2, model=model, optimizer=optimizer, trainer={"step": 2})
except StateSaveError as error:
    print(error.errno, error)
print(latest_state(root).name)
"""


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_state(tmp_path):
    """The review's case: a full cache disk surfaced as a SafetensorError traceback from state.py."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "state")], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    error_line, latest = result.stdout.strip().splitlines()
    assert error_line.startswith("27 could not save the training state of step 2 into ")
    assert "File too large" in error_line and "training resumes from the last complete save" in error_line
    assert latest == "step-00000001"
    assert sorted(path.name for path in (tmp_path / "state").iterdir()) == ["LATEST", "step-00000001"]
