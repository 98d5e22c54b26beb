"""The run configuration: typed dataclasses, the single source of truth (no torch import here).

`RunConfig` and its sections are here; the training loop's `TrainConfig` is `pipeline.config.train`, the
demo's generator and teacher settings `pipeline.config.demo`.

`conf/` registers these as Hydra structured configs; the stages read them. Validation and derived values
live in `__post_init__` (or `validate(num_layers)` where the teacher's depth is needed), so a bad value
fails with one line naming the field, before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.demo import DemoDataConfig, DemoTeacherConfig
from pipeline.config.train import TrainConfig

STAGES = ("teacher", "teacher_finetune", "samples", "start", "loo", "convert", "mmr", "step", "loo_step", "kl",
          "kl_step", "sft", "evaluate", "quality")
DISTILL_ON = ("distill", "generic", "mix")
LOO_MODES = ("mixer", "block")
LOO_METRICS = ("accuracy", "nll")
DEVICES = ("auto", "cpu", "cuda")
MIXERS = ("mamba", "gdn")  # the recurrent mixers a conversion can choose (schedule.mixers)
DEFAULT_MIXERS = ["mamba"]
# How each step after the first conversion picks its layers (schedule.selection): "mmr" (the recipe: an MMR
# scoring of the previous checkpoint), "loo" (the teacher's static LOO ranking), "kl" (KL-guided selection,
# pipeline/stages/kl.py: the KL fall from keeping each layer as attention in an otherwise converted model)
SELECTIONS = ("mmr", "loo", "kl")
PRECISIONS = ("auto", "fp32", "bf16-mixed")


# Field metadata of settings that change how fast a stage runs, never what it computes: left out of cache keys.
KEY_NEUTRAL = "key_neutral"
# Field metadata of a setting added after cache keys were first written: left out of a key while it holds
# its default (the behaviour before it existed), so adding it leaves every existing key unchanged.
KEY_SINCE = "key_since"


def added_field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **metadata: Any):
    """A dataclass field marked KEY_SINCE (see there)."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={KEY_SINCE: True, **metadata})
    return field(default=default, metadata={KEY_SINCE: True, **metadata})


class ConfigError(ValueError):
    """A run configuration that cannot work."""


# A name that becomes one segment of a path or an object key (run_name; the store's checkpoint names follow
# the same rule, pipeline.store.manifest.check_name): letters, digits, '.', '_', '-', not starting with '.'
# or '-' (so never '..', a hidden folder or an option), no separators, bounded length.
PATH_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_PATH_NAME_LENGTH = 100


def check_int(value: Any, setting: str, minimum: int = 1, maximum: int | None = None, *,
              optional: bool = False) -> None:
    """`value` is an int in [minimum, maximum] (or None when `optional`), else one ConfigError line."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{setting} must be an int {bound}{' or null' if optional else ''}, got {value!r}")


def check_path_name(value: Any, setting: str) -> str:
    """`value` as one safe path segment, else one ConfigError line naming `setting`."""
    if not isinstance(value, str) or not PATH_NAME_PATTERN.match(value) or len(value) > MAX_PATH_NAME_LENGTH:
        raise ConfigError(
            f"{setting} must be one name of letters, digits, '.', '_' or '-' (not starting with '.' or '-', at "
            f"most {MAX_PATH_NAME_LENGTH} characters; it becomes a folder and object-key name), got {value!r}")
    return value


def _finetune_defaults() -> TrainConfig:
    return TrainConfig(steps=300, lr=1e-4, warmup_steps=30, batch_size=16, max_length=PRETRAINED_MAX_LENGTH,
                       trainable="all", loss="ce", save_every=50, log_every=10)


@dataclass
class TeacherFinetuneConfig:
    # SFT of the user's teacher on data.sft before anything else (a model that lacks the skill the hybrid
    # is to keep); the fine-tuned model is then the run's teacher for every later stage. Off by default.
    enabled: bool = False
    train: TrainConfig = field(default_factory=_finetune_defaults)

    def __post_init__(self) -> None:
        if self.train.loss != "ce":
            raise ConfigError(f"teacher.finetune.train.loss must be 'ce' (fine-tuning learns from data.sft), "
                              f"got {self.train.loss!r}")


@dataclass
class TeacherConfig:
    # a transformers teacher: local folder, file:// or s3:// URI (the flow downloads it once), or a .gguf
    # file (dequantised); None = the demo teacher
    path: str | None = None
    demo: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    finetune: TeacherFinetuneConfig = field(default_factory=TeacherFinetuneConfig)


@dataclass
class StartConfig:
    # A hybrid checkpoint to continue the progressive conversion from (ours, Apriel-H1 or MambaInLlama
    # layout; a local folder, file:// or s3:// URI, like teacher.path); None = start from the teacher.
    # With it the chain skips LOO and the first conversion: MMR and the steps continue from its layer
    # pattern to every schedule.counts entry (each larger than its Mamba count), distilling from the
    # teacher, and the evaluation reports it as `start` beside the new checkpoints.
    path: str | None = None


TEACHER_SAMPLES = "teacher"  # data.generic=teacher: the run's teacher's own samples (pipeline.data.samples)


@dataclass
class SamplesConfig:
    """data.generic=teacher: generic text sampled from the run's teacher at `temperature` from varied
    openings (the `samples` stage), so that the generic-text NLL and KL are measured on text the teacher
    models well. Rows per split; `max_new_tokens` per row."""

    train: int = 0  # rows to train on (data.distill_on=generic / mix); 0 when only evaluated
    validation: int = 32
    test: int = 128
    max_new_tokens: int = 128
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train", "validation", "test"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"data.samples.{name} must be an int >= 0, got {value!r}")
        if self.test < 1:
            raise ConfigError("data.samples.test must be >= 1 (the evaluation scores the test rows)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or not self.temperature > 0:
            raise ConfigError("data.samples needs max_new_tokens >= 1, batch_size >= 1 and temperature > 0")


@dataclass
class DataConfig:
    # datasets sources: a hub name, a local jsonl/parquet file or folder; None = the bundled demo data.
    distill: str | None = None  # reasoning traces (chat rows) to distil on -- the recipe's key choice
    sft: str | None = None  # chat rows for the final SFT
    eval: str | None = None  # chat rows with an "answer" field (test split) for accuracy / NLL / KL
    # plain-text rows, for the "generic data" comparison and the evaluation's generic NLL; "teacher": the
    # run's teacher's own samples (data.samples), the generic text a pretrained teacher models well
    generic: str | None = None
    # which source the distillation stages use: "distill", "generic", or "mix" (both, in equal shares of rows)
    distill_on: str = "distill"
    max_length: int = 96
    # A user's data.distill without validation* files keeps this share of its train rows (the last ones) out
    # of training; LOO scores on them when neither data.eval nor data.distill has a validation split
    validation_share: float = 0.02
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    samples: SamplesConfig = added_field(default_factory=SamplesConfig)

    def __post_init__(self) -> None:
        if self.distill_on not in DISTILL_ON:
            raise ConfigError(f"data.distill_on must be one of {', '.join(DISTILL_ON)}, got {self.distill_on!r}")
        if not 0.0 < self.validation_share < 1.0:
            raise ConfigError(f"data.validation_share must be in (0, 1), got {self.validation_share!r}")
        check_int(self.max_length, "data.max_length", 2)
        for name in ("distill", "sft", "eval", "generic"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"data.{name} must be a path, URL or hub name (or null for the demo data), "
                                  f"got {value!r}")

    def view(self, *kinds: str) -> DataConfig:
        """The part of this section a stage reads when it loads only `kinds` (distill, sft, eval, generic):
        other sources blanked, and of the demo settings only those that generate what it reads from the
        demo. A stage given a view has exactly what it reads in its cache key. A view of one kind, the
        source data.distill_on names, is what the distillations read (`distill_on` says which)."""
        sources = ("distill", "sft", "eval", "generic")
        unknown = set(kinds) - set(sources)
        if unknown:
            raise ValueError(f"unknown data kinds {sorted(unknown)}")
        kept = {name: getattr(self, name) if name in kinds else None for name in sources}
        from_demo = {name for name in kinds if getattr(self, name) is None}
        defaults = DemoDataConfig()
        demo = dataclasses.replace(
            self.demo,
            **{name: getattr(defaults, name) for name in DEMO_TEXT_FIELDS if "generic" not in from_demo},
            **{name: getattr(defaults, name) for name in DEMO_REASONING_FIELDS if not from_demo - {"generic"}},
        )
        if not from_demo:
            demo = defaults
        return dataclasses.replace(
            self, **kept, distill_on="generic" if kinds == ("generic",) else "distill",
            validation_share=self.validation_share if "distill" in kinds and self.distill is not None
            else DataConfig.validation_share,
            demo=demo,
            samples=self.samples if kept["generic"] == TEACHER_SAMPLES else SamplesConfig(),
        )

    @property
    def samples_teacher(self) -> bool:
        """Whether the generic text is the run's teacher's own samples (data.generic=teacher)."""
        return self.generic == TEACHER_SAMPLES


    def for_distillation(self) -> DataConfig:
        """The view the distillations (conversion, step, MMR trial) read: the source `distill_on` names, or
        for "mix" both reasoning traces and generic text (`distill_on` says which)."""
        if self.distill_on == "mix":
            return dataclasses.replace(self.view("distill", "generic"), distill_on="mix")
        return self.view(self.distill_on)


# DemoDataConfig fields by what they generate (the seed feeds both).
DEMO_REASONING_FIELDS = ("n_train", "n_validation", "n_test", "min_ops", "max_ops", "min_operand", "max_operand",
                         "max_value")
DEMO_TEXT_FIELDS = ("n_text_train", "n_text_validation", "n_text_test", "min_sentences", "max_sentences")


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
class GDNConfig:
    """Gated DeltaNet mixers (read only where `schedule.mixers` lists "gdn"). Their heads and head dim are the
    teacher's attention's (the initialisation copies q/k/v/o_proj), so the conv is the one free setting."""

    d_conv: int = 4  # the causal depthwise conv over q, k and v

    def __post_init__(self) -> None:
        if not isinstance(self.d_conv, int) or self.d_conv < 1:
            raise ConfigError(f"gdn.d_conv must be an int >= 1, got {self.d_conv!r}")


@dataclass
class ScheduleConfig:
    # Number of converted (Mamba or Gated DeltaNet) layers after each conversion: counts[0] by LOO (the
    # first distillation), every later one from the previous checkpoint by `selection` (MMR by default). The
    # recipe: [25, 27, 30, 34, 37, 40] of 50 layers.
    counts: list[int] = field(default_factory=lambda: [4, 5, 6])
    # The mixers a conversion chooses from: "mamba" (Mamba-1, MIL) and "gdn" (Gated DeltaNet). The first
    # conversion gives all its layers mixers[0]; MMR scores every (remaining attention layer, mixer) pair
    # and each step converts the lowest-scoring pairs, one mixer a layer. The default [mamba] is the recipe
    # as it always was (and leaves every cache key as it was).
    mixers: list[str] = field(default_factory=lambda: list(DEFAULT_MIXERS))
    # How every step after the first conversion picks its layers (SELECTIONS): "mmr" (the recipe, the
    # default: `mmr-H-K` scores each remaining attention layer, `step` converts the lowest), "loo" (the
    # teacher's static LOO ranking, `loo_step`), "kl" (KL-guided: `kl-H-K` then `kl_step`). Read by the
    # chain only, which calls other stages for it; the default adds nothing to any key.
    selection: str = added_field("mmr")
    # Optimiser steps of the first distillation (counts[0], converted from the teacher at once: the recipe's
    # long end-to-end H-25 run); every later step trains `train.steps`. None: `train.steps` for all. The rest
    # of the first conversion's settings are `train`'s (warmup_steps and save_every must fit within it).
    first_steps: int | None = added_field(None)

    def __post_init__(self) -> None:
        check_int(self.first_steps, "schedule.first_steps", optional=True)
        if self.selection not in SELECTIONS:
            raise ConfigError(f"schedule.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.selection != "mmr" and list(self.mixers) != DEFAULT_MIXERS:
            raise ConfigError(f"schedule.selection={self.selection} converts to Mamba only; schedule.mixers "
                              f"{list(self.mixers)} needs schedule.selection=mmr (MMR chooses each layer's mixer)")
        mixers = list(self.mixers)
        if not mixers or isinstance(self.mixers, str):
            raise ConfigError(f"schedule.mixers is a non-empty list of {', '.join(MIXERS)}, got {self.mixers!r}")
        unknown = [mixer for mixer in mixers if mixer not in MIXERS]
        if unknown:
            raise ConfigError(f"schedule.mixers: unknown mixer(s) {unknown}; valid: {', '.join(MIXERS)}")
        if len(set(mixers)) != len(mixers):
            raise ConfigError(f"schedule.mixers has duplicates: {mixers}")
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
    num_examples: int = 64  # validation problems scored per layer (never the test split)
    batch_size: int = 64
    max_new_tokens: int = 48  # greedy decoding budget of the accuracy metric

    def __post_init__(self) -> None:
        if self.mode not in LOO_MODES:
            raise ConfigError(f"loo.mode must be one of {LOO_MODES}, got {self.mode!r}")
        if self.metric not in LOO_METRICS:
            raise ConfigError(f"loo.metric must be one of {LOO_METRICS}, got {self.metric!r}")
        for name in ("num_examples", "batch_size", "max_new_tokens"):
            check_int(getattr(self, name), f"loo.{name}")


# --- the settings a pretrained teacher gets (teacher=local; `RunConfig.with_pretrained_settings`) ----------
# The demo's settings (the dataclass defaults below) are calibrated for a 1M-parameter model trained here
# from scratch on character tokens: lr 2e-3 diverges on a pretrained model. These are for pretrained
# models of 0.1-10B parameters with BPE tokenizers; conf/{train,mmr,sft}/pretrained.yaml hold the same
# values for Hydra (a test checks they agree).
PRETRAINED_MAX_LENGTH = 512


def pretrained_distill() -> TrainConfig:
    return TrainConfig(steps=500, lr=1e-4, warmup_steps=50, batch_size=16, max_length=PRETRAINED_MAX_LENGTH,
                       trainable="all", loss="reverse_kl", save_every=50, log_every=10, kl_chunk_tokens=2048)


def pretrained_mmr() -> TrainConfig:
    return TrainConfig(steps=100, lr=1e-4, warmup_steps=10, batch_size=8, max_length=PRETRAINED_MAX_LENGTH,
                       trainable="mamba", loss="reverse_kl", save_every=0, log_every=25, kl_chunk_tokens=2048,
                       loss_window=10)


def pretrained_sft() -> TrainConfig:
    return TrainConfig(steps=300, lr=5e-5, warmup_steps=30, batch_size=16, max_length=PRETRAINED_MAX_LENGTH,
                       trainable="all", loss="ce", save_every=50, log_every=10)


def _distill_defaults() -> TrainConfig:
    return TrainConfig(steps=150, lr=2e-3, warmup_steps=10, batch_size=32, max_length=96, trainable="all",
                       loss="reverse_kl", save_every=25, log_every=10, kl_chunk_tokens=1024)


def _mmr_defaults() -> TrainConfig:
    return TrainConfig(steps=100, lr=2e-3, warmup_steps=10, batch_size=16, max_length=96, trainable="mamba",
                       loss="reverse_kl", save_every=0, log_every=25, kl_chunk_tokens=1024, loss_window=10)


@dataclass
class MMRConfig:
    # One trial per candidate layer: `train.steps` steps (the recipe's 100) training only that layer's new
    # mixer; its score is the mean distillation loss of the last `train.loss_window` steps.
    train: TrainConfig = field(default_factory=_mmr_defaults)
    # Independent initialisations of each candidate's new mixer (draws of its random parameters), each
    # trained as above on the same batches; a candidate's score is the mean of their losses (mmr.json
    # lists each draw and the standard deviation). Cost: candidates x seeds x train.steps. A Gated DeltaNet
    # candidate is trained once whatever this says (its initialisation from attention draws nothing).
    seeds: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"mmr.seeds must be an int >= 1 (initialisations per candidate), got {self.seeds!r}")
        if self.train.trainable != "mamba":
            raise ConfigError(f"mmr.train.trainable must be 'mamba' (a trial trains only its new mixer), got {self.train.trainable!r}")
        if not self.train.is_distillation:
            raise ConfigError(f"mmr.train.loss must be reverse_kl or forward_kl (the score is a distillation loss), got {self.train.loss!r}")
        if self.train.loss_window > self.train.steps:
            raise ConfigError(f"mmr.train.loss_window={self.train.loss_window} exceeds mmr.train.steps={self.train.steps}")


def _sft_defaults() -> TrainConfig:
    return TrainConfig(steps=100, lr=5e-4, warmup_steps=10, batch_size=32, max_length=96, trainable="all",
                       loss="ce", save_every=25, log_every=10)


@dataclass
class SFTConfig:
    checkpoint: str = "last"  # which conversion to fine-tune: "last" or a name like "H-5"
    train: TrainConfig = field(default_factory=_sft_defaults)


@dataclass
class LMEvalConfig:
    """lm-evaluation-harness tasks run on the teacher and every checkpoint (needs the `lm-eval` extra)."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task (or group) names; empty = not run
    limit: int | None = None  # at most this many documents per task (None = all)
    num_fewshot: int | None = None  # None = each task's own default
    apply_chat_template: bool = False  # prompts through the tokenizer's chat template
    batch_size: int = 16
    max_length: int | None = None  # context length given to lm-eval; None = the model's max_position_embeddings
    include_path: str | None = None  # a folder of task YAML files of your own, beside lm-eval's

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            raise ConfigError(f"evaluate.lm_eval.tasks is a list of task names, got the string {self.tasks!r}")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("evaluate.lm_eval needs batch_size >= 1 and limit >= 1 (or null)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"evaluate.lm_eval.num_fewshot must be >= 0, got {self.num_fewshot}")
        check_int(self.max_length, "evaluate.lm_eval.max_length", optional=True)


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
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    # NLL and KL also on `nll_examples` rows of the generic text's test split (data.generic): what the
    # distillation kept of the teacher's general language modelling; false = the reasoning rows only
    generic_nll: bool = added_field(True)

    def __post_init__(self) -> None:
        for name in ("num_examples", "batch_size", "max_new_tokens", "nll_examples", "throughput_batch",
                     "throughput_prompt", "throughput_new_tokens", "throughput_repeats"):
            check_int(getattr(self, name), f"evaluate.{name}")


@dataclass
class StorageConfig:
    uri: str = "./artifacts"  # a folder, file://..., or s3://bucket/prefix
    endpoint_url: str | None = None  # S3 endpoint (MinIO, ...); credentials come from the AWS environment only
    # local cache root: store/ (S3 downloads), work/ (resumable stage state), teachers/; None = ./.cache
    cache_dir: str | None = None
    # a checkpoint version replaced by a newer one (another run's re-put) stays readable this long for the
    # runs still reading it, then the next put removes it; on a folder store, also as long as a run holds it
    retain_hours: float = 6.0

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ConfigError(f"storage.uri must be a folder, file:// or s3:// URI, got {self.uri!r}")
        if self.endpoint_url is not None and not str(self.endpoint_url).lower().startswith(("http://", "https://")):
            raise ConfigError(f"storage.endpoint_url must be an http(s):// URL of an S3 server (or null), "
                              f"got {self.endpoint_url!r}")
        if not isinstance(self.retain_hours, int | float) or isinstance(self.retain_hours, bool) \
                or not 0 <= self.retain_hours <= 24 * 365:
            raise ConfigError(f"storage.retain_hours must be a number of hours >= 0, got {self.retain_hours!r}")


@dataclass
class TrackingConfig:
    uri: str | None = None  # None = sqlite:///<cwd>/mlflow.db; any MLflow server URI by override
    experiment: str = "hybrid-distill"
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment.strip() or len(self.experiment) > 250:
            raise ConfigError(f"tracking.experiment must be a non-empty name (at most 250 characters), "
                              f"got {self.experiment!r}")


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto = cuda if available
    # The one precision setting, read by every stage. "fp32": fp32 everywhere. "bf16-mixed": trained
    # parameters and optimiser state in fp32 (master weights), compute under bf16 autocast, frozen models
    # (the distillation teacher, LOO, evaluation) held in bf16, losses from fp32 logits. auto = bf16-mixed
    # on CUDA, fp32 on CPU.
    precision: str = "auto"
    # torch CPU threads; None = torch's default. Speed only: no cache key holds it (KEY_NEUTRAL)
    threads: int | None = field(default=None, metadata={KEY_NEUTRAL: True})
    # Processes that train (teacher, convert, step, sft): N > 1 runs each stage's training under
    # `torchrun --nproc-per-node N` with FSDP2 (gloo on CPU, NCCL on CUDA: one GPU a process). Every
    # process count trains on the same global batches, so results differ only by floating-point reduction
    # order (KEY_NEUTRAL: a checkpoint made with one count is reused with another). The MMR stage runs its
    # trials on N worker processes instead (one GPU each), each trial exactly as with one process.
    nproc: int = field(default=1, metadata={KEY_NEUTRAL: True})
    # Several machines: nnodes > 1 with a c10d rendezvous endpoint (host:port) that every node reaches; the
    # stage's machine is one node, and each other node runs the command the stage prints (same code, and
    # the stage's work_dir on a shared filesystem).
    nnodes: int = field(default=1, metadata={KEY_NEUTRAL: True})
    rdzv_endpoint: str | None = field(default=None, metadata={KEY_NEUTRAL: True})

    def __post_init__(self) -> None:
        for name in ("nproc", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"hardware.{name} must be an int >= 1, got {value!r}")
        check_int(self.threads, "hardware.threads", optional=True)
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"hardware.nnodes={self.nnodes} needs hardware.rdzv_endpoint (host:port of the rendezvous)")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}",
                                                               str(self.rdzv_endpoint)):
            raise ConfigError(f"hardware.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"hardware.device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"hardware.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class AblationConfig:
    """`python -m flows.ablation`: which data, which loss, which layer order (flows/ablation.py)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # each arm once per seed (distillation seed)
    # the arms to run (pipeline.ablation.ARMS names); empty = all. A continued arm computes (or finds) the
    # recipe arm's checkpoint it starts from. Lets several processes split one seed's arms.
    arms: list[str] = field(default_factory=list)
    # where ablation-<device>.{json,md,png} are written (a folder; the GPU run can point it at $OUT)
    results_dir: str = "benchmarks/results"
    # how long a run waits for another run computing the same stage (concurrent runs on one store share
    # the teacher and LOO: the others wait for the first); 0 = fail at once, naming the holder
    lease_wait_s: float = field(default=3600.0, metadata={KEY_NEUTRAL: True})
    # the CE weight of the reverse KL + CE arm (train.ce_weight of `reasoning-rkl-ce`)
    ce_weight: float = 0.5
    # the report's file names: <report_name>-<device>.{json,md,png}
    report_name: str = "ablation"

    def __post_init__(self) -> None:
        if not (isinstance(self.ce_weight, (int, float)) and not isinstance(self.ce_weight, bool)
                and self.ce_weight > 0):
            raise ConfigError(f"ablation.ce_weight must be a number > 0, got {self.ce_weight!r}")
        if not self.report_name or "/" in self.report_name:
            raise ConfigError(f"ablation.report_name must be a file name without '/', got {self.report_name!r}")
        seeds = list(self.seeds)
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ConfigError(f"ablation.seeds must be a non-empty list of integers >= 0, got {seeds}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"ablation.seeds has duplicates: {seeds}")
        if self.lease_wait_s < 0:
            raise ConfigError(f"ablation.lease_wait_s must be >= 0, got {self.lease_wait_s}")


@dataclass
class RunConfig:
    run_name: str = "demo"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    start: StartConfig = field(default_factory=StartConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    gdn: GDNConfig = field(default_factory=GDNConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loo: LOOConfig = field(default_factory=LOOConfig)
    train: TrainConfig = field(default_factory=_distill_defaults)  # the distillation of every conversion
    mmr: MMRConfig = field(default_factory=MMRConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    def __post_init__(self) -> None:
        check_path_name(self.run_name, "run_name")
        check_int(self.seed, "seed", 0, 2**32 - 1)
        if self.sft.checkpoint != "last" and not PATH_NAME_PATTERN.match(str(self.sft.checkpoint)):
            raise ConfigError(f"sft.checkpoint must be 'last' or a checkpoint name like 'H-5', got {self.sft.checkpoint!r}")
        if self.train.loss not in ("reverse_kl", "forward_kl"):
            raise ConfigError(f"train.loss is the distillation loss: reverse_kl or forward_kl, got {self.train.loss!r}")
        if self.sft.train.loss != "ce":
            raise ConfigError(f"sft.train.loss must be 'ce' (SFT learns from the data, no teacher), got {self.sft.train.loss!r}")
        try:
            self.first_train()
        except ValueError as err:  # warmup_steps beyond the first conversion's steps, and the like
            message = str(err).replace("TrainConfig.", "train.")
            raise ConfigError(f"schedule.first_steps={self.schedule.first_steps} does not fit train: {message}") from None
        if self.teacher.finetune.enabled and not self.teacher.path:
            raise ConfigError("teacher.finetune.enabled fine-tunes a teacher you give (teacher.path); the demo "
                              "teacher is trained here on the demo data already (teacher.demo.train)")

    def first_train(self) -> TrainConfig:
        """The first conversion's distillation settings: `train` with `schedule.first_steps` steps when set
        (every later step, and every other stage, trains with `train` as it is)."""
        if self.schedule.first_steps is None:
            return self.train
        return dataclasses.replace(self.train, steps=self.schedule.first_steps)

    def with_pretrained_settings(self) -> RunConfig:
        """This configuration with the training settings made for a pretrained teacher (what `teacher=local`
        selects in Hydra): train, mmr.train, sft.train and data.max_length replaced, the rest kept."""
        return dataclasses.replace(
            self, train=pretrained_distill(), mmr=dataclasses.replace(self.mmr, train=pretrained_mmr()),
            sft=dataclasses.replace(self.sft, train=pretrained_sft()),
            data=dataclasses.replace(self.data, max_length=PRETRAINED_MAX_LENGTH))

    def uses_demo_settings(self) -> list[str]:
        """The training sections still at the demo's calibration (its dataclass defaults), which a user's
        teacher must not run with unawares: the plan refuses them with teacher.path set."""
        demo = {"train": (self.train, _distill_defaults()), "mmr.train": (self.mmr.train, _mmr_defaults()),
                "sft.train": (self.sft.train, _sft_defaults())}
        return [name for name, (value, default) in demo.items() if value == default]


def checkpoint_name(n_mamba: int, sft: bool = False) -> str:
    """H-K names, as in the recipe, K the converted (Mamba or Gated DeltaNet) layers (H-0 = the teacher
    converted with none)."""
    return f"H-{n_mamba}" + ("-SFT" if sft else "")


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def key_plain(obj: Any) -> Any:
    """Like `to_plain`, without the fields marked KEY_NEUTRAL, nor those marked KEY_SINCE while at their
    default: what a cache key digests of a setting."""
    if dataclasses.is_dataclass(obj):
        return {f.name: key_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get(KEY_NEUTRAL)
                and not (f.metadata.get(KEY_SINCE) and getattr(obj, f.name) == _field_default(f))}
    if isinstance(obj, dict):
        return {str(k): key_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [key_plain(v) for v in obj]
    return to_plain(obj)


def from_plain(cls: type, data: Any) -> Any:
    """The inverse of `to_plain` for a config dataclass: nested sections rebuilt (and so validated again)."""
    import typing

    if not dataclasses.is_dataclass(cls) or not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**{name: from_plain(hints[name], value) if dataclasses.is_dataclass(hints.get(name)) else value
                  for name, value in data.items()})


def to_plain(obj: Any) -> Any:
    """Dataclass / OmegaConf config -> plain dicts and lists (for JSON, digests and MLflow params)."""
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
    "AblationConfig",
    "ConfigError",
    "DISTILL_ON",
    "DataConfig",
    "EvaluateConfig",
    "GDNConfig",
    "HardwareConfig",
    "LMEvalConfig",
    "LOOConfig",
    "MIXERS",
    "MMRConfig",
    "MambaConfig",
    "RunConfig",
    "SFTConfig",
    "STAGES",
    "SELECTIONS",
    "SamplesConfig",
    "TEACHER_SAMPLES",
    "KEY_SINCE",
    "added_field",
    "ScheduleConfig",
    "StartConfig",
    "StorageConfig",
    "TeacherConfig",
    "TeacherFinetuneConfig",
    "PRETRAINED_MAX_LENGTH",
    "pretrained_distill",
    "pretrained_mmr",
    "pretrained_sft",
    "TrackingConfig",
    "KEY_NEUTRAL",
    "check_path_name",
    "checkpoint_name",
    "from_plain",
    "key_plain",
    "to_plain",
]
