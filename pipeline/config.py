"""The run configuration: typed dataclasses, the single source of truth (no torch import here).

`conf/` registers these as Hydra structured configs; the stages read them. Validation and derived values
live in `__post_init__` (or `validate(num_layers)` where the teacher's depth is needed), so a bad value
fails with one line naming the field, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.data.demo import DemoDataConfig, DemoTeacherConfig
from pipeline.train.config import TrainConfig

STAGES = ("teacher", "loo", "convert", "mmr", "step", "sft", "evaluate")
LOO_MODES = ("mixer", "block")
LOO_METRICS = ("accuracy", "nll")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16-mixed")


class ConfigError(ValueError):
    """A run configuration that cannot work."""


@dataclass
class TeacherConfig:
    # a transformers teacher: local folder, file:// or s3:// URI (the flow downloads it once); None = the demo teacher
    path: str | None = None
    demo: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)


@dataclass
class DataConfig:
    # datasets sources: a hub name, a local jsonl/parquet file or folder; None = the bundled demo data.
    distill: str | None = None  # reasoning traces (chat rows) to distil on -- the recipe's key choice
    sft: str | None = None  # chat rows for the final SFT
    eval: str | None = None  # chat rows with an "answer" field (test split) for accuracy / NLL / KL
    generic: str | None = None  # plain-text rows, for the "generic data" comparison
    distill_on: str = "distill"  # which source the distillation stages use: "distill" or "generic"
    max_length: int = 96
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)

    def __post_init__(self) -> None:
        if self.distill_on not in ("distill", "generic"):
            raise ConfigError(f"data.distill_on must be 'distill' or 'generic', got {self.distill_on!r}")


@dataclass
class MambaConfig:
    d_state: int = 16
    dt_rank: int = 16
    d_conv: int = 4
    gqa_expansion: str = "chunk"  # "chunk" (Apriel/M1 layout) or "head_aligned"

    def __post_init__(self) -> None:
        if self.gqa_expansion not in ("chunk", "head_aligned"):
            raise ConfigError(f"mamba.gqa_expansion must be 'chunk' or 'head_aligned', got {self.gqa_expansion!r}")
        for name in ("d_state", "dt_rank", "d_conv"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mamba.{name} must be >= 1")


@dataclass
class ScheduleConfig:
    # Number of Mamba layers after each conversion: counts[0] by LOO (the first distillation), every
    # later one by MMR from the previous checkpoint. The recipe: [25, 27, 30, 34, 37, 40] of 50 layers.
    counts: list[int] = field(default_factory=lambda: [4, 5, 6])

    def __post_init__(self) -> None:
        counts = list(self.counts)
        if not counts:
            raise ConfigError("schedule.counts is empty: give at least the first conversion's Mamba layer count")
        if any(not isinstance(c, int) or c < 1 for c in counts):
            raise ConfigError(f"schedule.counts must be positive integers, got {counts}")
        if any(b <= a for a, b in zip(counts, counts[1:])):
            raise ConfigError(f"schedule.counts must be strictly increasing, got {counts}")

    def validate(self, num_layers: int) -> None:
        if self.counts[-1] > num_layers:
            raise ConfigError(
                f"schedule.counts {list(self.counts)} exceeds the teacher's {num_layers} layers"
            )


@dataclass
class LOOConfig:
    mode: str = "mixer"  # "mixer": the layer's attention becomes identity; "block": the whole block does
    metric: str = "accuracy"  # "accuracy" (answers checked) or "nll" (assistant-token NLL)
    num_examples: int = 64  # eval problems scored per layer
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.mode not in LOO_MODES:
            raise ConfigError(f"loo.mode must be one of {LOO_MODES}, got {self.mode!r}")
        if self.metric not in LOO_METRICS:
            raise ConfigError(f"loo.metric must be one of {LOO_METRICS}, got {self.metric!r}")


def _distill_defaults() -> TrainConfig:
    return TrainConfig(steps=150, lr=2e-3, warmup_steps=10, batch_size=32, max_length=96, trainable="all",
                       loss="reverse_kl", save_every=25, log_every=10, kl_chunk_tokens=1024)


@dataclass
class MMRConfig:
    steps: int = 100  # training steps per candidate layer (the recipe's 100)
    lr: float = 2e-3
    batch_size: int = 16
    score_window: int = 10  # MMR score = mean distillation loss of the last this many steps

    def __post_init__(self) -> None:
        if self.steps < 1 or self.score_window < 1 or self.score_window > self.steps:
            raise ConfigError(f"mmr needs steps >= 1 and 1 <= score_window <= steps, got {self.steps}, {self.score_window}")


def _sft_defaults() -> TrainConfig:
    return TrainConfig(steps=100, lr=5e-4, warmup_steps=10, batch_size=32, max_length=96, trainable="all",
                       loss="ce", save_every=25, log_every=10)


@dataclass
class SFTConfig:
    checkpoint: str = "last"  # which conversion to fine-tune: "last" or a name like "H-5"
    train: TrainConfig = field(default_factory=_sft_defaults)


@dataclass
class EvaluateConfig:
    num_examples: int = 200  # test problems for answer accuracy
    batch_size: int = 100
    max_new_tokens: int = 48
    nll_examples: int = 256
    # throughput: generate() at this batch, prompt and output length, median of `repeats`
    throughput_batch: int = 16
    throughput_prompt: int = 256
    throughput_new_tokens: int = 64
    throughput_repeats: int = 3


@dataclass
class StorageConfig:
    uri: str = "./artifacts"  # a folder, file://..., or s3://bucket/prefix
    endpoint_url: str | None = None  # S3 endpoint (MinIO, ...); credentials come from the AWS environment only
    # local cache root: store/ (S3 downloads), work/ (resumable stage state), teachers/; None = ./.cache
    cache_dir: str | None = None


@dataclass
class TrackingConfig:
    uri: str | None = None  # None = sqlite:///<cwd>/mlflow.db; any MLflow server URI by override
    experiment: str = "hybrid-distill"
    enabled: bool = True


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto = cuda if available
    # The one precision setting, read by every stage. "fp32": fp32 everywhere. "bf16-mixed": trained
    # parameters and optimiser state in fp32 (master weights), compute under bf16 autocast, frozen models
    # (the distillation teacher, LOO, evaluation) held in bf16, losses from fp32 logits. auto = bf16-mixed
    # on CUDA, fp32 on CPU.
    precision: str = "auto"
    threads: int | None = None  # torch CPU threads; None = torch's default

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"hardware.device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"hardware.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class RunConfig:
    run_name: str = "demo"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loo: LOOConfig = field(default_factory=LOOConfig)
    train: TrainConfig = field(default_factory=_distill_defaults)  # the distillation of every conversion
    mmr: MMRConfig = field(default_factory=MMRConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        if self.train.loss not in ("reverse_kl", "forward_kl"):
            raise ConfigError(f"train.loss is the distillation loss: reverse_kl or forward_kl, got {self.train.loss!r}")


def checkpoint_name(n_mamba: int, sft: bool = False) -> str:
    """H-K names, as in the recipe (H-0 = the teacher converted with no Mamba layer)."""
    return f"H-{n_mamba}" + ("-SFT" if sft else "")


def to_plain(obj: Any) -> Any:
    """Dataclass / OmegaConf config -> plain dicts and lists (for JSON, digests and MLflow params)."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    try:  # an OmegaConf container
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    return obj


__all__ = [
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "HardwareConfig",
    "LOOConfig",
    "MMRConfig",
    "MambaConfig",
    "RunConfig",
    "SFTConfig",
    "STAGES",
    "ScheduleConfig",
    "StorageConfig",
    "TeacherConfig",
    "TrackingConfig",
    "checkpoint_name",
    "to_plain",
]
