"""What every stage shares: devices, model and tokenizer loading, data, metadata files, reporting.

A stage is a plain function `run_<stage>(cfg, <input folders>, out_dir, *, work_dir, reporter) -> dict`.
It reads checkpoint folders, writes its output folder, and keeps resumable training state in `work_dir`
(never in the output: a checkpoint holds only what a user loads).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config import RunConfig, to_plain

log = logging.getLogger(__name__)

STAGE_META = "stage.json"  # beside each stage's output: stage, parent, layer pattern, timings, metrics
RUN_CONFIG = "run_config.json"  # the resolved run configuration the stage ran with


class StageError(ValueError):
    """Bad input to a stage (a missing teacher, unusable data, ...): one line naming what is wrong."""


class Reporter(Protocol):
    """Where stages send metrics and files (MLflow through the orchestration layer, or nowhere)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | os.PathLike) -> None: ...

    def progress(self, message: str) -> None: ...


class ConsoleReporter:
    """Prints progress lines; drops metrics (the default when a stage runs on its own)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike) -> None:
        pass

    def progress(self, message: str) -> None:
        print(f"{self.prefix}{message}", flush=True)


# --- hardware ------------------------------------------------------------------------------------

def resolve_device(cfg: RunConfig) -> torch.device:
    want = cfg.hardware.device
    if want == "cuda" and not torch.cuda.is_available():
        raise StageError("hardware.device=cuda but no CUDA device is available")
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    if cfg.hardware.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.hardware.dtype]


# --- checkpoints ---------------------------------------------------------------------------------

def require_folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise StageError(f"{what} path does not exist: {folder}")
    if not (folder / "config.json").is_file():
        raise StageError(f"{what} at {folder} is not a transformers checkpoint (no config.json)")
    return folder


def load_model(path: str | os.PathLike, cfg: RunConfig, what: str = "checkpoint"):
    """A transformers causal LM (a teacher or a hybrid) on the run's device, in eval mode."""
    import pipeline.model  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    folder = require_folder(path, what)
    check_safe_to_load(folder, what, trust_remote_code=cfg.teacher.trust_remote_code)
    device = resolve_device(cfg)
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=resolve_dtype(cfg, device), use_safetensors=True,
            trust_remote_code=cfg.teacher.trust_remote_code, ignore_mismatched_sizes=True, output_loading_info=True,
        )
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise StageError(f"{what} at {folder} cannot be loaded ({type(exc).__name__}: {reason}); "
                         "the files are truncated, corrupt or not a transformers checkpoint") from None
    # A weight that is missing or has another shape would be initialised at random: refuse the checkpoint.
    mismatched = [f"{key} {tuple(saved)} vs {tuple(expected)}" for key, saved, expected in info["mismatched_keys"]]
    if mismatched:
        raise StageError(f"{what} at {folder}: {len(mismatched)} weights have other shapes than its config.json "
                         f"says (e.g. {'; '.join(mismatched[:2])}); the weights do not belong to this config")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise StageError(f"{what} at {folder}: {len(missing)} weights its config.json needs are not in its "
                         f"safetensors files (e.g. {', '.join(missing[:3])}); the checkpoint is incomplete")
    return model.to(device).eval()


def check_safe_to_load(folder: Path, what: str, *, trust_remote_code: bool) -> None:
    """Weights are read only from safetensors (a pickle can run code when loaded), and code shipped in a
    checkpoint folder runs only if the user turned teacher.trust_remote_code on."""
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(path.name for path in folder.iterdir() if path.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"only {', '.join(pickled[:3])}" if pickled else "no weight files"
        raise StageError(
            f"{what} at {folder} has {found}: weights are loaded only from safetensors files; convert them "
            "(e.g. save_pretrained(..., safe_serialization=True)) and point to that folder"
        )
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise StageError(f"{what} at {folder}: config.json does not parse ({exc})") from None
    if auto_map and not trust_remote_code:
        raise StageError(
            f"{what} at {folder} needs Python code from its own folder (config.json auto_map: "
            f"{', '.join(sorted(auto_map))}); it is not run unless you set teacher.trust_remote_code=true"
        )


def load_tokenizer(path: str | os.PathLike):
    from pipeline.data import load_tokenizer as _load

    return _load(path)


def save_checkpoint(model, tokenizer, out_dir: Path) -> None:
    """config.json + model.safetensors + tokenizer files (safetensors only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_meta(out_dir: Path, stage: str, cfg: RunConfig, *, parent: str | None, started: float,
               **extra: Any) -> dict[str, Any]:
    """stage.json + run_config.json beside the output (every checkpoint carries its config and lineage)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"stage": stage, "run_name": cfg.run_name, "parent": parent,
            "wall_time_s": round(time.time() - started, 2), **extra}
    (out_dir / STAGE_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out_dir / RUN_CONFIG).write_text(json.dumps(to_plain(cfg), indent=2) + "\n")
    return meta


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / STAGE_META
    return json.loads(path.read_text()) if path.is_file() else {}


# --- data ----------------------------------------------------------------------------------------

@dataclass
class StageData:
    """The run's data, loaded once per stage: demo data by default, any `datasets` source by config."""

    cfg: RunConfig
    tokenizer: Any
    _cache: dict[str, Any] = field(default_factory=dict)

    def _demo(self):
        if "demo" not in self._cache:
            from pipeline.data import generate_demo_data

            self._cache["demo"] = generate_demo_data(self.cfg.data.demo)
        return self._cache["demo"]

    def rows(self, kind: str, split: str):
        """Raw rows of `kind` (distill, sft, eval, generic) for `split` (train, validation, test)."""
        key = f"rows:{kind}:{split}"
        if key not in self._cache:
            from pipeline.data import load_rows

            source = getattr(self.cfg.data, kind)
            if source is None:
                demo = self._demo()
                source, split = (demo.text if kind == "generic" else demo.reasoning)[split], "train"
            self._cache[key] = load_rows(source, split)
        return self._cache[key]

    def tokenized(self, kind: str, split: str = "train"):
        key = f"tok:{kind}:{split}"
        if key not in self._cache:
            from pipeline.data import tokenize_rows

            self._cache[key] = tokenize_rows(self.rows(kind, split), self.tokenizer, self.cfg.data.max_length)
        return self._cache[key]

    def batch_source(self, kind: str, batch_size: int, seed: int):
        """position -> iterator of padded batches, deterministic, so training resumes mid-epoch."""
        from pipeline.data import iter_batches

        dataset = self.tokenized(kind)
        pad_id = self.tokenizer.pad_token_id

        def from_position(position: int):
            return iter_batches(dataset, batch_size, pad_id, seed=seed, start=position)

        return from_position

    def eval_problems(self, count: int) -> list[dict[str, Any]]:
        rows = self.rows("eval", "test")
        if "answer" not in rows.column_names:
            raise StageError("evaluation data needs an 'answer' column to check generated answers")
        return [rows[i] for i in range(min(count, len(rows)))]

    def eval_batches(self, count: int, batch_size: int = 32):
        from pipeline.data import iter_batches, tokenize_rows

        rows = self.rows("eval", "test")
        dataset = tokenize_rows(rows.select(range(min(count, len(rows)))), self.tokenizer, self.cfg.data.max_length)
        return list(iter_batches(dataset, batch_size, self.tokenizer.pad_token_id, shuffle=False,
                                 stop=(len(dataset) + batch_size - 1) // batch_size))


def distill_kind(cfg: RunConfig) -> str:
    return "generic" if cfg.data.distill_on == "generic" else "distill"


def metrics_callback(reporter: Reporter, prefix: str, every_line: int = 1):
    """Training metrics -> reporter (with the step) and a short progress line."""
    def callback(metrics) -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in vars(metrics).items()
                  if k != "step" and isinstance(v, (int, float)) and v is not None}
        reporter.log_metrics(values, step=metrics.step)
        reporter.progress(
            f"  {prefix} step {metrics.step}: loss {metrics.loss:.4f} lr {metrics.lr:.2e} "
            f"{metrics.tokens_per_second:,.0f} tok/s"
        )
    return callback


__all__ = [
    "ConsoleReporter",
    "Reporter",
    "StageData",
    "StageError",
    "distill_kind",
    "load_model",
    "load_tokenizer",
    "metrics_callback",
    "read_meta",
    "require_folder",
    "resolve_device",
    "resolve_dtype",
    "save_checkpoint",
    "write_meta",
]
