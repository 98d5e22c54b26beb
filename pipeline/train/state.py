"""Resumable training state, written atomically into a state directory.

Layout: `<state_dir>/step-00000040/` holds
- `model.safetensors`  the student's weights (safetensors; tied weights handled by `save_model`),
- `optimizer.pt`       the AdamW state dict (torch.save),
- `trainer.pt`         step, data position, counters, recent losses, RNG states, the config (torch.save);
and `<state_dir>/LATEST` names the state to resume (one line, `step-00000040`).

A save never touches the state that `LATEST` names until the new one is committed:
1. states that `LATEST` does not name (left by a kill) are removed;
2. the new state is written to `.step-00000044.tmp/`, fsynced and renamed to `step-00000044/`, beside
   the old one (the same step saved again goes to `step-00000040.1/`, so the names never collide);
3. `LATEST` is replaced atomically (temporary file, fsync, rename): this is the commit;
4. the old state is removed.
A kill at any point leaves `LATEST` naming a complete state: the old one up to step 3, the new one after.
Without `LATEST` (a state directory written before it existed, or a kill before the first commit) the
newest complete `step-*` directory is resumed; a directory named `step-*` is only ever made by a rename
of a complete temporary one.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
_STATE_NAME = re.compile(r"^step-(\d{8,})(?:\.(1))?$")
_TEMPORARY_NAME = re.compile(r"^\.step-\d{8,}(?:\.1)?\.tmp$")
_POINTER = "LATEST"
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
_TRAINER_FILE = "trainer.pt"
_STATE_FILES = (_MODEL_FILE, _OPTIMIZER_FILE, _TRAINER_FILE)


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
    """The committed state under `state_dir` (the one `LATEST` names), or None if there is none.

    A state that `LATEST` does not name (written, but killed before the commit) is ignored. Without a
    usable `LATEST`, the newest complete `step-*` directory.
    """
    root = Path(state_dir)
    if not root.is_dir():
        return None
    pointer = root / _POINTER
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STATE_NAME.match(name) and _complete(root / name):
            return root / name
        log.warning("%s names %r, which is not a complete state; using the newest complete one", pointer, name)
    found = [
        (int(match.group(1)), int(match.group(2) or 0), path)
        for path in root.iterdir()
        if (match := _STATE_NAME.match(path.name)) and _complete(path)
    ]
    return max(found)[2] if found else None


class StateSaveError(OSError):
    """A training state could not be written (a full disk or quota, permissions): one line naming the folder
    and the cause. The committed state (`LATEST`) is untouched, so a run started again resumes from it."""

    def __str__(self) -> str:
        return str(self.args[-1]) if self.args else "the training state could not be saved"


def save_state(
    state_dir: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any],
) -> Path:
    """Write the state of `step` beside the committed one, commit it by replacing `LATEST`, drop the old one.
    A write that fails (disk full, ...) removes the unfinished state and raises StateSaveError."""
    root = Path(state_dir)
    try:
        return _save_state(root, step=step, model=model, optimizer=optimizer, trainer=trainer)
    except Exception as error:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        from safetensors import SafetensorError

        if not (isinstance(error, OSError | SafetensorError)
                or (isinstance(error, RuntimeError) and _write_failure(error))):
            raise
        for leftover in root.glob(".step-*.tmp") if root.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        code = getattr(error, "errno", None) or _errno_of(error, root)
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
        raise StateSaveError(code, f"could not save the training state of step {step} into {root}: {reason}; "
                                   "free space (or fix permissions) and run again: training resumes from the "
                                   "last complete save") from None


def _write_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return any(sign in text for sign in ("write failed", "no space", "os error", "unexpected pos", "file write",
                                         "quota", "permission denied", "read-only"))


def _errno_of(error: BaseException, root: Path) -> int:
    """The errno a write failure stands for (safetensors and torch hide it in their message)."""
    import errno as errnos

    found = re.search(r"(?:os error|code:)\s*(\d+)", str(error))
    if found:
        return int(found.group(1))
    try:
        if shutil.disk_usage(root if root.exists() else root.parent).free < 1 << 20:
            return errnos.ENOSPC
    except OSError:
        pass
    return errnos.EIO


def _save_state(root: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                trainer: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    current = latest_state(root)
    name = f"step-{step:08d}"
    if current is not None and current.name == name:  # the same step saved again: a second name beside it
        name += ".1"
    _remove_states(root, keep=current)  # uncommitted states and temporaries left by a kill
    temporary = root / f".{name}.tmp"
    temporary.mkdir()
    save_model(model, str(temporary / _MODEL_FILE))
    torch.save(optimizer.state_dict(), temporary / _OPTIMIZER_FILE)
    torch.save({"format_version": STATE_FORMAT_VERSION, **trainer}, temporary / _TRAINER_FILE)
    for file_name in _STATE_FILES:
        with open(temporary / file_name, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(temporary)
    final = root / name
    os.replace(temporary, final)
    _fsync_directory(root)
    _commit(root, name)
    _remove_states(root, keep=final)
    return final


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / file_name).is_file() for file_name in _STATE_FILES)


def _commit(root: Path, name: str) -> None:
    """Point `LATEST` at `name`: written to a temporary file, fsynced, renamed over the old pointer."""
    temporary = root / f".{_POINTER}.tmp"
    with open(temporary, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, root / _POINTER)
    _fsync_directory(root)


def _remove_states(root: Path, *, keep: Path | None) -> None:
    """Remove every state and temporary state directory under `root` except `keep`."""
    for path in root.iterdir():
        if path != keep and path.is_dir() and (_STATE_NAME.match(path.name) or _TEMPORARY_NAME.match(path.name)):
            shutil.rmtree(path)


def _fsync_directory(path: Path) -> None:
    """Make the renames inside `path` durable (a power cut, not only a kill, keeps them)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
