"""What every stage shares: devices, model and tokenizer loading, data, metadata files, reporting.

A stage is a plain function `run_<stage>(cfg, <input folders>, out_dir, *, work_dir, reporter) -> dict`.
It reads checkpoint folders, writes its output folder, and keeps resumable training state in `work_dir`
(never in the output: a checkpoint holds only what a user loads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
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

    def trial(self, name: str) -> contextlib.AbstractContextManager[Reporter]:
        """A reporter for one of several trainings inside a stage (an MMR trial), so that each one's
        curves sit under the same `train/...` keys in a run of its own (MLflow: a nested run)."""
        ...


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

    @contextlib.contextmanager
    def trial(self, name: str) -> Iterator[ConsoleReporter]:
        yield self


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
    device = resolve_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(cfg, device))
    return model.to(device).eval()


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

    def describe(self, kind: str, split: str = "train") -> dict[str, Any]:
        """What a stage trained on, for its stage.json (and MLflow's dataset inputs): `datasets`'
        fingerprint of the rows as the digest, the configured source (or the demo generator and its seed)."""
        rows = self.rows(kind, split)
        source = getattr(self.cfg.data, kind)
        return {"name": f"{kind}-{split}", "source": source or f"demo:{'generic' if kind == 'generic' else 'reasoning'}"
                f"?seed={self.cfg.data.demo.seed}", "digest": rows._fingerprint, "rows": len(rows),
                "columns": list(rows.column_names)}

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


def cumulative_train_tokens(parent_dir: str | os.PathLike, tokens_seen: int) -> int:
    """Tokens trained on since the teacher along a checkpoint's lineage (the recipe's frontier axis):
    the parent's count (0 for the teacher, whose own pre-training is not counted) plus this stage's."""
    return int(read_meta(parent_dir).get("cumulative_train_tokens", 0)) + int(tokens_seen)


def parent_checkpoint(parent_dir: str | os.PathLike) -> str:
    """The name of the checkpoint a stage started from ("teacher", "H-4", ...), as its stage.json says."""
    return str(read_meta(parent_dir).get("checkpoint") or Path(parent_dir).name)


def distill_kind(cfg: RunConfig) -> str:
    return "generic" if cfg.data.distill_on == "generic" else "distill"


# Training curves go under the same keys in every stage's run (teacher, conversions, MMR trials, SFT), so
# MLflow's chart view overlays the runs: train/loss, train/kl, train/ce, train/lr, train/grad_norm, ...
TRAIN_METRIC_KEYS = {
    "loss": "train/loss",
    "distill_loss": "train/kl",
    "ce_loss": "train/ce",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_s",
    "step_time_s": "train/step_time_s",
    "tokens_seen": "train/tokens_seen",
}


def train_metrics(metrics) -> dict[str, float]:
    """A StepMetrics as `train/...` metrics (a field without a name above keeps its own: `train/<field>`)."""
    return {TRAIN_METRIC_KEYS.get(key, f"train/{key}"): float(value) for key, value in vars(metrics).items()
            if key != "step" and isinstance(value, (int, float)) and value is not None}


def metrics_callback(reporter: Reporter, label: str):
    """Training metrics -> reporter under the `train/...` keys (with the step), and a short progress line
    naming what trains (`label`: the checkpoint, an MMR trial)."""
    def callback(metrics) -> None:
        reporter.log_metrics(train_metrics(metrics), step=metrics.step)
        reporter.progress(
            f"  {label} step {metrics.step}: loss {metrics.loss:.4f} lr {metrics.lr:.2e} "
            f"{metrics.tokens_per_second:,.0f} tok/s"
        )
    return callback


__all__ = [
    "ConsoleReporter",
    "cumulative_train_tokens",
    "Reporter",
    "StageData",
    "StageError",
    "TRAIN_METRIC_KEYS",
    "distill_kind",
    "load_model",
    "load_tokenizer",
    "metrics_callback",
    "parent_checkpoint",
    "read_meta",
    "require_folder",
    "resolve_device",
    "resolve_dtype",
    "save_checkpoint",
    "train_metrics",
    "write_meta",
]
