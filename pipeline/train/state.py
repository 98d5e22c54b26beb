"""Resumable training state, written atomically into a state directory.

Layout: `<state_dir>/step-00000040/` holds
- `model.safetensors`  the student's weights (safetensors; tied weights handled by `save_model`),
- `optimizer.pt`       the AdamW state dict (torch.save),
- `trainer.pt`         step, data position, counters, recent losses, RNG states, the config (torch.save).
A state is first written to `.step-00000040.tmp/` and then renamed, so a directory named `step-*` is
always complete; older states are removed after the rename. The newest `step-*` is the one resumed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

STATE_FORMAT_VERSION = 1
_STATE_NAME = re.compile(r"^step-(\d{8,})$")
_TEMPORARY_NAME = re.compile(r"^\.step-\d{8,}\.tmp$")
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
_TRAINER_FILE = "trainer.pt"


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), python and numpy RNG states, in torch.load(weights_only)-safe types."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise RuntimeError(
                f"saved state has RNG states for {len(state['cuda'])} CUDA devices, "
                f"this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )


def latest_state(state_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete state directory under `state_dir`, or None."""
    root = Path(state_dir)
    if not root.is_dir():
        return None
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := _STATE_NAME.match(path.name))]
    return max(found)[1] if found else None


def save_state(
    state_dir: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any],
) -> Path:
    """Write the state of `step` atomically (temp dir, then rename) and drop older states."""
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    temporary = root / f".{final.name}.tmp"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    save_model(model, str(temporary / _MODEL_FILE))
    torch.save(optimizer.state_dict(), temporary / _OPTIMIZER_FILE)
    torch.save({"format_version": STATE_FORMAT_VERSION, **trainer}, temporary / _TRAINER_FILE)
    for name in (_MODEL_FILE, _OPTIMIZER_FILE, _TRAINER_FILE):
        with open(temporary / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # the same step saved again (e.g. a finished run called twice)
        shutil.rmtree(final)
    os.replace(temporary, final)
    for path in root.iterdir():
        if path != final and path.is_dir() and (_STATE_NAME.match(path.name) or _TEMPORARY_NAME.match(path.name)):
            shutil.rmtree(path)
    return final


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The trainer dict (step, position, counters, RNG, config) of a state directory, without loading weights."""
    path = Path(path)
    trainer = torch.load(path / _TRAINER_FILE, weights_only=True)
    if trainer.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"{path / _TRAINER_FILE} has state format {trainer.get('format_version')!r}, "
            f"expected {STATE_FORMAT_VERSION}"
        )
    return trainer


def load_weights_and_optimizer(
    path: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a state directory's weights into `model` and its AdamW state into `optimizer`."""
    path = Path(path)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / _MODEL_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(
            f"{path / _MODEL_FILE} does not fit the student: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    optimizer.load_state_dict(torch.load(path / _OPTIMIZER_FILE, weights_only=True))
