"""What every stage shares: devices, model and tokenizer loading, metadata files, reporting. The data a
stage reads (`StageData`, held-out selection, mixing, the answer-budget check) is the data layer's
(`pipeline.data.stage_data`), `StageError` is `pipeline.errors`' and `Reporter` / `ConsoleReporter` are
`pipeline.reporting`'s; all are re-exported here.

A stage is a plain function of the config sections it reads and its input folders, called by the one
executor (`pipeline.executor`) as `run_<stage>(**settings, **inputs, out_dir=, work_dir=, reporter=)`.
It receives nothing else (never the whole RunConfig), so its cache key, derived from exactly those
arguments, covers everything it reads. It writes its output folder and keeps resumable training state in
`work_dir` (never in the output: a checkpoint holds only what a user loads).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import STAGES, HardwareConfig, to_plain
from pipeline.data.stage_data import (  # noqa: F401  (re-exported: the data layer)
    MAX_CUT_SHARE,
    MIX,
    MIX_PARTS,
    VALIDATION_SPLIT,
    StageData,
    _has_split,
    check_answer_budget,
    distillation_source,
    held_out_count,
    padding_id,
    reference_reply,
    tokenizer_digest,
)
from pipeline.errors import StageError
from pipeline.config.train import TrainConfig
from pipeline.reporting import ConsoleReporter, Reporter  # noqa: F401  (re-exported: the stages' reporter)

log = logging.getLogger(__name__)

STAGE_META = "stage.json"  # beside each stage's output: stage, parent, layer pattern, timings, metrics
RUN_CONFIG = "run_config.json"  # the settings the stage ran with (exactly its arguments: what its key covers)


def stage(name: str, version: int):
    """Marks a stage function: `name` (one of pipeline.config.STAGES) and its code version, which enters
    the cache key. Bump the version whenever a change to the stage (or to code only it calls) changes
    what it writes: committed outputs of the old version are then computed again. A name not in STAGES is
    refused when the stage is defined (at import)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage name {name!r}; expected one of pipeline.config.STAGES: {', '.join(STAGES)}")

    def mark(function):
        function.stage_name, function.code_version = name, version
        return function
    return mark


# --- hardware ------------------------------------------------------------------------------------

def resolve_device(hardware: HardwareConfig) -> torch.device:
    want = hardware.device
    if want == "cuda" and not torch.cuda.is_available():
        raise StageError("hardware.device=cuda but no CUDA device is available")
    if hardware.threads:
        torch.set_num_threads(hardware.threads)
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_precision(hardware: HardwareConfig, device: torch.device | None = None) -> str:
    """hardware.precision resolved: "bf16-mixed" or "fp32" (auto = bf16-mixed on CUDA, fp32 on CPU)."""
    if hardware.precision != "auto":
        return hardware.precision
    device = device if device is not None else resolve_device(hardware)
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def resolve_dtype(hardware: HardwareConfig | Runtime, device: torch.device, *, fp32: bool = False) -> torch.dtype:
    """The dtype a model is held in: fp32 when asked (`fp32`: models about to be trained, whose weights
    are the fp32 masters, and the models the evaluate stage scores); the other frozen ones (the
    distillation teacher, LOO's teacher) in bf16 under bf16-mixed, else fp32.

    Evaluation holds its models in fp32 so that a checkpoint's answer accuracy does not depend on bf16
    rounding through greedy decoding; under bf16-mixed the evaluate stage measures speed on a bf16 copy. The
    bf16 / fp32 comparisons are in benchmarks/results/gpu-pipeline-h200.md."""
    if fp32:
        return torch.float32
    return torch.bfloat16 if resolve_precision(hardware, device) == "bf16-mixed" else torch.float32


@dataclass(frozen=True)
class Runtime:
    """The hardware section resolved once (`Runtime.resolve`): where a stage's models compute, in which
    precision, and where its training runs. Plain fields, so a torchrun rank's job and an MMR worker's job
    carry it as it is (`load_model` takes it in place of the hardware section, resolving nothing again)."""

    device: str  # "cpu" | "cuda" (hardware.device "auto" resolved)
    precision: str  # "fp32" | "bf16-mixed" (hardware.precision "auto" resolved)
    nproc: int = 1  # processes (torchrun ranks; MMR: worker processes)
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    threads: int | None = None  # torch CPU threads (hardware.threads; None: torch's default)
    torchrun: bool = False  # a stage's training runs under torchrun (`pipeline.stages.launch.fit`)

    @classmethod
    def resolve(cls, hardware: HardwareConfig, train: TrainConfig | None = None,
                state_dir: str | os.PathLike | None = None) -> Runtime:
        """`hardware` resolved (this sets hardware.threads in torch, as `resolve_device` does). Training
        runs under torchrun when asked (nproc or nnodes > 1, or `train.cpu_offload`, which offloads FSDP's
        shards), or to resume a distributed state in `state_dir` (with one process, then: the DCP state
        reshards to it)."""
        from pipeline.train.distributed import latest_distributed_state

        device = resolve_device(hardware)
        torchrun = (hardware.nproc > 1 or hardware.nnodes > 1 or (train is not None and train.cpu_offload)
                    or (state_dir is not None and latest_distributed_state(state_dir) is not None))
        return cls(device=device.type, precision=resolve_precision(hardware, device), nproc=hardware.nproc,
                   nnodes=hardware.nnodes, rdzv_endpoint=hardware.rdzv_endpoint, threads=hardware.threads,
                   torchrun=torchrun)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def dtype(self, *, fp32: bool = False) -> torch.dtype:
        """The dtype a model is held in (`resolve_dtype`)."""
        return resolve_dtype(self, self.torch_device, fp32=fp32)  # a Runtime's precision is resolved already


# --- checkpoints ---------------------------------------------------------------------------------

def local_folder(path: str | None) -> Path | None:
    """The local path a setting names (a plain path or a file:// URI), or None for a remote URI."""
    if not path:
        return None
    from urllib.parse import unquote, urlparse

    parsed = urlparse(path)
    if parsed.scheme.lower() == "file":
        return Path(unquote(parsed.netloc + parsed.path)).expanduser()
    if parsed.scheme and len(parsed.scheme) > 1:  # s3://, hf://, ... (one letter: a Windows drive)
        return None
    return Path(path).expanduser()


def require_folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise StageError(f"{what} path does not exist: {folder}")
    if not (folder / "config.json").is_file():
        raise StageError(f"{what} at {folder} is not a transformers checkpoint (no config.json)")
    return folder


def load_model(path: str | os.PathLike, hardware: HardwareConfig | Runtime, what: str = "checkpoint", *,
               fp32: bool = False):
    """A transformers causal LM (a teacher or a hybrid; Apriel-H1 and MambaInLlama checkpoints are
    imported as hybrids) on the run's device (`hardware`: the section, or the `Runtime` resolved from it),
    in eval mode, in the dtype `resolve_dtype` gives (`fp32`:
    held in fp32 whatever the precision, e.g. a model about to be trained); from safetensors only,
    refusing weights that are missing or shaped otherwise than its config says (they would be initialised
    at random)."""
    import pipeline.model  # noqa: F401  (registers the hybrid with the Auto classes)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from pipeline.model.layouts import APRIEL_H1, MAMBAINLLAMA, LayoutError, detect_layout, import_checkpoint

    folder = require_folder(path, what)
    check_safe_to_load(folder, what)
    runtime = hardware if isinstance(hardware, Runtime) else Runtime.resolve(hardware)
    device, dtype = runtime.torch_device, runtime.dtype(fp32=fp32)
    try:
        if detect_layout(folder) in (APRIEL_H1, MAMBAINLLAMA):
            return import_checkpoint(folder, dtype).to(device).eval()
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=False,
            ignore_mismatched_sizes=True, output_loading_info=True,
        )
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        if isinstance(exc, LayoutError):
            raise StageError(f"{what} at {folder}: {exc}") from None
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


def _registered_here(folder: Path) -> bool:
    """A self-contained export of our own hybrid: its auto_map names code this package already registers,
    so loading it runs none of the folder's files."""
    from pipeline.model.config import HybridConfig

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == HybridConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def check_safe_to_load(folder: Path, what: str) -> None:
    """Weights are read only from safetensors (a pickle can run code when loaded), and code shipped in a
    checkpoint folder never runs: the supported teachers (Llama, Mistral, Qwen2) and our hybrids are
    built from the classes installed here, so a folder that needs its own code is refused."""
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
    if auto_map and not _registered_here(folder):
        raise StageError(code_refusal(f"{what} at {folder}", "config.json", auto_map))
    quantised = non_float_weights(folder)
    if quantised:
        raise StageError(f"{what} at {folder}: {quantised}")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            tokenizer_map = json.loads(tokenizer_config.read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise StageError(f"{what} at {folder}: tokenizer_config.json does not parse ({exc})") from None
        if tokenizer_map:
            raise StageError(code_refusal(f"{what} at {folder}", "tokenizer_config.json", tokenizer_map))


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), read without the data.
    Raises ValueError for a file that is not safetensors."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name} is shorter than a safetensors header")
        size = int.from_bytes(prefix, "little")
        if size > 100_000_000:
            raise ValueError(f"{path.name} has a {size}-byte header: not a safetensors file")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no safetensors header")
    return header


def non_float_weights(folder: Path) -> str | None:
    """What is wrong with a folder whose weights are not floating point (an int8 / 4-bit quantised export,
    which a float model would load as cast integers), or None. Reads the safetensors headers only."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and config.get("quantization_config"):
        method = (config["quantization_config"] or {}).get("quant_method", "?") \
            if isinstance(config["quantization_config"], dict) else "?"
        return (f"config.json has a quantization_config ({method}): a quantised checkpoint cannot be distilled "
                "from; give its unquantised (float) weights")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            header = safetensors_header(path)
        except (OSError, ValueError):
            return None  # a truncated or corrupt file: loading reports it
        for name, entry in header.items():
            if name != "__metadata__" and name.endswith(".weight") and isinstance(entry, dict) \
                    and entry.get("dtype") not in FLOAT_DTYPES:
                return (f"weight {name} is stored as {entry.get('dtype')} in {path.name}: a quantised checkpoint "
                        "cannot be distilled from; give its unquantised (float) weights")
    return None


def incomplete_weights(folder: Path) -> str | None:
    """What is wrong with a folder's safetensors files, read from their headers and sizes only: a file cut
    short (a copy or download interrupted), a file that is not safetensors, or a shard the index names that
    is not there. None if they look whole."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"model.safetensors.index.json is unreadable ({type(error).__name__}: {error})"
        missing = [name for name in shards if not (folder / str(name)).is_file()]
        if missing:
            return (f"model.safetensors.index.json names {len(missing)} shard(s) that are not in the folder "
                    f"(e.g. {missing[0]}); the checkpoint is incomplete")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            header = safetensors_header(path)
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            return f"{path.name} is not a readable safetensors file ({error}); the file is corrupt or truncated"
        if path.stat().st_size < 8 + size + end:
            return (f"{path.name} is cut short ({path.stat().st_size} bytes, its header needs {8 + size + end}); "
                    "copy or download it again")
    return None


def code_refusal(where: str, file_name: str, auto_map: Any) -> str:
    """The line that refuses a checkpoint whose `file_name` (config.json, tokenizer_config.json) names Python
    code of its own folder in `auto_map`."""
    names = sorted(auto_map) if isinstance(auto_map, dict) else [str(auto_map)]
    return (f"{where} needs Python code from its own folder ({file_name} auto_map: {', '.join(names)}); code "
            "from a checkpoint folder is never run: save the teacher as a Llama, Mistral or Qwen2 checkpoint")


def check_vocabulary(model, tokenizer, where: str) -> None:
    """The model's embedding has a row for every token id its tokenizer can produce."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise StageError(f"{where}: its tokenizer has {len(tokenizer)} tokens but its embedding only {rows} rows "
                         f"(config.json vocab_size {getattr(model.config, 'vocab_size', '?')}): the tokenizer does "
                         "not belong to these weights")


def load_tokenizer(path: str | os.PathLike):
    from pipeline.data import load_tokenizer as _load

    return _load(path)


def save_checkpoint(model, tokenizer, out_dir: Path, dtype: str | None = None) -> None:
    """config.json + model.safetensors + tokenizer files (safetensors only). `dtype` ("float32" |
    "bfloat16", a TrainConfig.save_dtype): the weights are cast to it first (the model itself is cast:
    call this when training is over); Mamba's A_log and D stay fp32."""
    from safetensors import SafetensorError

    if dtype is not None:
        model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except (OSError, SafetensorError) as error:  # a full disk, a quota, permissions
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
        raise StageError(f"could not write the checkpoint into {out_dir}: {reason}; free space (or fix "
                         "permissions) on that disk (storage.cache_dir) and run again") from None


def write_meta(out_dir: Path, stage: str, *, parent: str | None, started: float, **extra: Any) -> dict[str, Any]:
    """stage.json beside the output: its lineage, layer pattern, timings and results (every checkpoint carries
    them; its settings, run_config.json, the executor writes from the call: `write_run_config`). Redacted
    (`pipeline.redaction`): a data URL's password or token never lands in a checkpoint."""
    from pipeline.redaction import redact

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"stage": stage, "parent": parent, "wall_time_s": round(time.time() - started, 2), **extra}
    (out_dir / STAGE_META).write_text(json.dumps(redact(meta, keys=False), indent=2, default=str) + "\n")
    return meta


def write_run_config(out_dir: Path, settings: dict[str, Any]) -> None:
    """run_config.json beside the output: the stage's config arguments by name, exactly what its cache key
    covers (the executor writes it from `StageCall.settings`, the very dict the key digests). Redacted."""
    from pipeline.redaction import redact

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RUN_CONFIG).write_text(json.dumps(redact(to_plain(settings)), indent=2) + "\n")


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / STAGE_META
    return json.loads(path.read_text()) if path.is_file() else {}


def cumulative_train_tokens(parent_dir: str | os.PathLike | None, tokens_seen: int) -> int:
    """Tokens trained on since the teacher along a checkpoint's lineage (the recipe's frontier axis):
    the parent's count (0 for the teacher, `parent_dir` None, whose own pre-training is not counted) plus
    this stage's."""
    parent = read_meta(parent_dir).get("cumulative_train_tokens", 0) if parent_dir is not None else 0
    return int(parent) + int(tokens_seen)


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
    "check_vocabulary",
    "VALIDATION_SPLIT",
    "held_out_count",
    "stage",
    "cumulative_train_tokens",
    "Reporter",
    "StageData",
    "StageError",
    "TRAIN_METRIC_KEYS",
    "distillation_source",
    "load_model",
    "load_tokenizer",
    "metrics_callback",
    "read_meta",
    "require_folder",
    "resolve_device",
    "resolve_dtype",
    "resolve_precision",
    "Runtime",
    "save_checkpoint",
    "train_metrics",
    "write_meta",
    "write_run_config",
]
