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


def resolve_precision(cfg: RunConfig, device: torch.device | None = None) -> str:
    """hardware.precision resolved: "bf16-mixed" or "fp32" (auto = bf16-mixed on CUDA, fp32 on CPU)."""
    if cfg.hardware.precision != "auto":
        return cfg.hardware.precision
    device = device if device is not None else resolve_device(cfg)
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def resolve_dtype(cfg: RunConfig, device: torch.device, *, fp32: bool = False) -> torch.dtype:
    """The dtype a model is held in: fp32 when asked (`fp32`: models about to be trained, whose weights
    are the fp32 masters, and the models the evaluate stage scores); the other frozen ones (the
    distillation teacher, LOO's teacher) in bf16 under bf16-mixed, else fp32.

    Why evaluation holds its models in fp32: on one H200 the demo's hybrids held in bf16 answered far
    worse (greedy decoding through Mamba layers) than the same training run's checkpoints held in fp32,
    at the same teacher-forced NLL (benchmarks/results/gpu-pipeline-h200.md)."""
    if fp32:
        return torch.float32
    return torch.bfloat16 if resolve_precision(cfg, device) == "bf16-mixed" else torch.float32


# --- checkpoints ---------------------------------------------------------------------------------

def require_folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise StageError(f"{what} path does not exist: {folder}")
    if not (folder / "config.json").is_file():
        raise StageError(f"{what} at {folder} is not a transformers checkpoint (no config.json)")
    return folder


def load_model(path: str | os.PathLike, cfg: RunConfig, what: str = "checkpoint", *, fp32: bool = False):
    """A transformers causal LM (a teacher or a hybrid) on the run's device, in eval mode, in the dtype
    `resolve_dtype` gives (`fp32`: held in fp32 whatever the precision, e.g. a model about to be trained)."""
    import pipeline.model  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    folder = require_folder(path, what)
    device = resolve_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(cfg, device, fp32=fp32))
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    from pipeline.data import load_tokenizer as _load

    return _load(path)


def save_checkpoint(model, tokenizer, out_dir: Path, dtype: str | None = None) -> None:
    """config.json + model.safetensors + tokenizer files (safetensors only). `dtype` ("float32" |
    "bfloat16", a TrainConfig.save_dtype): the weights are cast to it first (the model itself is cast:
    call this when training is over); Mamba's A_log and D stay fp32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
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

# Generated demo data and tokenised datasets, shared by every stage of this process (a chain runs its
# stages in one process: each would otherwise regenerate and re-tokenise the same rows). Keyed by what
# determines them: the demo config or the source and split, the tokenizer's vocabulary and chat template,
# max_length. Bounded: the oldest entry goes first.
_SHARED: dict[tuple, Any] = {}
_SHARED_MAX = 16


def _shared(key: tuple, build):
    if key not in _SHARED:
        while len(_SHARED) >= _SHARED_MAX:
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = build()
    return _SHARED[key]


def tokenizer_digest(tokenizer) -> str:
    import hashlib

    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, type(tokenizer).__name__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StageData:
    """The run's data: demo data by default, any `datasets` source by config. Generated and tokenised
    rows are shared across the stages of one process (see `_SHARED`)."""

    cfg: RunConfig
    tokenizer: Any
    _cache: dict[str, Any] = field(default_factory=dict)

    def _demo(self):
        if "demo" not in self._cache:
            from pipeline.data import generate_demo_data

            demo_cfg = self.cfg.data.demo
            key = ("demo", json.dumps(to_plain(demo_cfg), sort_keys=True))
            self._cache["demo"] = _shared(key, lambda: generate_demo_data(demo_cfg))
        return self._cache["demo"]

    def _source_key(self, kind: str, split: str) -> tuple:
        source = getattr(self.cfg.data, kind)
        if source is None:
            return ("demo", json.dumps(to_plain(self.cfg.data.demo), sort_keys=True), kind, split)
        path = Path(str(source))
        if path.exists():  # a local file or folder: its contents may change between runs of one process
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            return ("source", str(path.resolve()), split, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                                               for f in files))
        return ("source", str(source), split)

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

            shared_key = ("tokenized", *self._source_key(kind, split), tokenizer_digest(self.tokenizer),
                          self.cfg.data.max_length)
            self._cache[key] = _shared(shared_key, lambda: tokenize_rows(self.rows(kind, split), self.tokenizer,
                                                                          self.cfg.data.max_length))
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
    "resolve_precision",
    "save_checkpoint",
    "write_meta",
]
