"""The recipe's stage calls, each built in one place: which stage function, which config sections feed which
of its arguments, and which inputs.

`pipeline.chain` (the conversion chain) and `pipeline.ablation` (its arms) walk these calls in their own
orders; neither builds a `StageCall` itself, so a call the two share (the teacher, its samples, LOO) is the
same call, settings and key and all. Every builder checks the call against the stage function's signature
(a wiring mistake fails before any work) and looks the stage function up in `pipeline.stages` when it is
called.

What an ablation arm varies is the distillation only: `Distillation` holds it (the training settings, the
data view, the seed, the MMR trials' settings, the mixers), and `Distillation.of(cfg)` is the chain's. The
builders of the conversions, the layer scorings and the steps take one; every other call reads its
sections from the RunConfig alone.

`teacher_output` and `samples_output` run the prefix both walks share (the teacher, fine-tuned when asked;
its own samples when data.generic=teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    DEFAULT_MIXERS,
    ConfigError,
    DataConfig,
    GDNConfig,
    MMRConfig,
    RunConfig,
    TrainConfig,
    checkpoint_name,
)
from pipeline.executor import Output, Source, StageCall
from pipeline.stages.start import START

TEACHER_FINETUNED = "teacher-ft"  # the output name of the fine-tuned teacher (teacher.finetune)
SAMPLES = "teacher-samples"  # the output name of the teacher's own samples (data.generic=teacher)


def _checked(name: str, run: Callable, settings: dict[str, Any], inputs: dict[str, Any],
             is_checkpoint: bool = True) -> StageCall:
    call = StageCall(name, run, settings, inputs, is_checkpoint)
    call.check_signature()
    return call


def _generic(generic: Output | None) -> dict[str, Output]:
    """The `generic` input (the teacher's samples) of a stage that reads generic text, when there is one."""
    return {"generic": generic} if generic is not None else {}


# --- the distillation: what an ablation arm varies ---------------------------------------------------------

@dataclass(frozen=True)
class Distillation:
    """The settings of a conversion's distillation and of the scorings that choose its layers."""

    train: TrainConfig  # every later step's distillation (train)
    first_train: TrainConfig  # the first conversion's (train with schedule.first_steps)
    data: DataConfig  # the distillation view (the sources data.distill_on names)
    seed: int  # the new mixers' initialisation, the data order, the trials'
    mmr: MMRConfig  # the MMR trials' settings; the KL-guided trials train with mmr.train too
    mixers: tuple[str, ...] = tuple(DEFAULT_MIXERS)  # schedule.mixers
    gdn: GDNConfig | None = None  # the settings of new Gated DeltaNet layers (read where mixers lists "gdn")

    @classmethod
    def of(cls, cfg: RunConfig) -> Distillation:
        """The conversion chain's distillation."""
        return cls(cfg.train, cfg.first_train(), cfg.data.for_distillation(), cfg.seed, cfg.mmr,
                   tuple(cfg.schedule.mixers), cfg.gdn)

    def mixer_settings(self, stage: str) -> dict[str, Any]:
        """What a conversion stage reads of the mixers and the gdn section, beyond its usual settings: nothing
        with the default mixers [mamba] (so Mamba-only runs keep their keys). The first conversion reads the
        first mixer (and gdn when that is "gdn"), MMR all mixers (and gdn when listed), a step gdn when
        listed (the settings of its new Gated DeltaNet layers)."""
        mixers = list(self.mixers)
        if mixers == DEFAULT_MIXERS:
            return {}
        if stage == "convert":
            return {"mixer": mixers[0], "gdn": self.gdn} if mixers[0] != "mamba" else {}
        if stage == "mmr":
            return {"mixers": mixers, **({"gdn": self.gdn} if "gdn" in mixers else {})}
        return {"gdn": self.gdn} if "gdn" in mixers else {}

    def step_settings(self, cfg: RunConfig, count: int) -> dict[str, Any]:
        """What every later step (step, kl_step, loo_step) reads: its distillation and its count."""
        return {"train": self.train, "data": self.data, "hardware": cfg.hardware, "seed": self.seed, "count": count}


# --- the teacher, its samples, a start checkpoint --------------------------------------------------------

def teacher_call(cfg: RunConfig, source: Source | None) -> StageCall:
    """The user's teacher (teacher.path) imported, or the demo teacher trained."""
    from pipeline.stages import import_teacher, run_teacher

    if cfg.teacher.path:
        if source is None:
            raise ConfigError("teacher.path is set but no teacher source was resolved")
        return _checked("teacher", import_teacher, {"hardware": cfg.hardware}, {"source": source})
    kinds = ("distill", "generic") if cfg.teacher.demo.generic_every else ("distill",)
    return _checked("teacher", run_teacher,
                    {"demo": cfg.teacher.demo, "data": cfg.data.view(*kinds), "hardware": cfg.hardware}, {})


def teacher_finetune_call(cfg: RunConfig, teacher: Output) -> StageCall:
    """The teacher fine-tuned on data.sft (teacher.finetune)."""
    from pipeline.stages import run_teacher_finetune

    return _checked(TEACHER_FINETUNED, run_teacher_finetune,
                    {"train": cfg.teacher.finetune.train, "data": cfg.data.view("sft"), "hardware": cfg.hardware},
                    {"teacher": teacher})


def samples_call(cfg: RunConfig, teacher: Output) -> StageCall:
    """The teacher's own samples, the generic text of a run with data.generic=teacher."""
    from pipeline.stages import run_samples

    return _checked(SAMPLES, run_samples, {"samples": cfg.data.samples, "hardware": cfg.hardware},
                    {"teacher": teacher}, is_checkpoint=False)


def start_call(cfg: RunConfig, source: Source | None, teacher: Output) -> StageCall:
    """The start checkpoint registered in the store (checked against the teacher). Its content digest is
    what every later stage's key holds of it (they take its Output as their parent)."""
    from pipeline.stages import import_start

    if source is None:
        raise ConfigError("start.path is set but no start source was resolved")
    return _checked(START, import_start, {"hardware": cfg.hardware}, {"source": source, "teacher": teacher})


def teacher_output(cfg: RunConfig, execute: Callable[[StageCall], Output], source: Source | None,
                   outputs: dict[str, Output] | None = None) -> Output:
    """The run's teacher: the `teacher` stage's output, then, with teacher.finetune.enabled, that teacher
    fine-tuned on data.sft (`teacher-ft`), which every later stage distils from. Records each output in
    `outputs` by name."""
    outputs = {} if outputs is None else outputs
    outputs["teacher"] = execute(teacher_call(cfg, source))
    if not cfg.teacher.finetune.enabled:
        return outputs["teacher"]
    outputs[TEACHER_FINETUNED] = execute(teacher_finetune_call(cfg, outputs["teacher"]))
    return outputs[TEACHER_FINETUNED]


def samples_output(cfg: RunConfig, execute: Callable[[StageCall], Output], teacher: Output,
                   outputs: dict[str, Output] | None = None) -> Output | None:
    """The teacher's samples, the `generic` input of the stages that read generic text, when data.generic is
    "teacher" (the `samples` stage runs once, after the teacher); None otherwise (they read data.generic)."""
    if not cfg.data.samples_teacher:
        return None
    output = execute(samples_call(cfg, teacher))
    if outputs is not None:
        outputs[SAMPLES] = output
    return output


# --- LOO, the conversions, the scorings, the steps ---------------------------------------------------------

def loo_call(cfg: RunConfig, teacher: Output) -> StageCall:
    """The teacher's LOO ranking: one for the chain and for every arm of the ablation."""
    from pipeline.stages import run_loo

    return _checked("loo", run_loo, {"loo": cfg.loo, "data": cfg.data.view("eval", "distill"),
                                     "hardware": cfg.hardware, "first_count": cfg.schedule.counts[0]},
                    {"teacher": teacher}, is_checkpoint=False)


def convert_call(cfg: RunConfig, distillation: Distillation, *, teacher: Output, loo: Output,
                 generic: Output | None = None, name: str | None = None) -> StageCall:
    """The first conversion, H-`schedule.counts[0]` (`name`: its output name, by default that H-K)."""
    from pipeline.stages import run_convert

    count = cfg.schedule.counts[0]
    return _checked(name or checkpoint_name(count), run_convert,
                    {"train": distillation.first_train, "mamba": cfg.mamba, "data": distillation.data,
                     "hardware": cfg.hardware, "seed": distillation.seed, "count": count,
                     **distillation.mixer_settings("convert")},
                    {"teacher": teacher, "loo": loo, **_generic(generic)})


def mmr_call(cfg: RunConfig, distillation: Distillation, *, teacher: Output, parent: Output) -> StageCall:
    """The MMR scoring of `parent`'s attention layers (`mmr-<parent>`)."""
    from pipeline.stages import run_mmr

    return _checked(f"mmr-{parent.name}", run_mmr,
                    {"mmr": distillation.mmr, "data": distillation.data, "hardware": cfg.hardware,
                     "seed": distillation.seed, **distillation.mixer_settings("mmr")},
                    {"teacher": teacher, "parent": parent}, is_checkpoint=False)


def kl_call(cfg: RunConfig, distillation: Distillation, *, teacher: Output, parent: Output,
            generic: Output | None = None) -> StageCall:
    """The KL-guided scoring of `parent`'s attention layers (`kl-<parent>`), with the MMR trials' settings."""
    from pipeline.stages import run_kl

    return _checked(f"kl-{parent.name}", run_kl,
                    {"train": distillation.mmr.train, "data": distillation.data, "hardware": cfg.hardware,
                     "seed": distillation.seed},
                    {"teacher": teacher, "parent": parent, **_generic(generic)}, is_checkpoint=False)


def step_call(cfg: RunConfig, distillation: Distillation, count: int, *, teacher: Output, parent: Output,
              mmr: Output, name: str | None = None) -> StageCall:
    """`parent` -> H-`count` by its MMR scoring (`name`: the output name, by default that H-K)."""
    from pipeline.stages import run_step

    return _checked(name or checkpoint_name(count), run_step,
                    {**distillation.step_settings(cfg, count), **distillation.mixer_settings("step")},
                    {"teacher": teacher, "parent": parent, "mmr": mmr})


def kl_step_call(cfg: RunConfig, distillation: Distillation, count: int, *, teacher: Output, parent: Output,
                 kl: Output, generic: Output | None = None, name: str | None = None) -> StageCall:
    """`parent` -> H-`count` by its KL-guided scoring."""
    from pipeline.stages import run_kl_step

    return _checked(name or checkpoint_name(count), run_kl_step, distillation.step_settings(cfg, count),
                    {"teacher": teacher, "parent": parent, **_generic(generic), "kl": kl})


def loo_step_call(cfg: RunConfig, distillation: Distillation, count: int, *, teacher: Output, parent: Output,
                  loo: Output, generic: Output | None = None, name: str | None = None) -> StageCall:
    """`parent` -> H-`count` by the teacher's static LOO ranking."""
    from pipeline.stages import run_loo_step

    return _checked(name or checkpoint_name(count), run_loo_step, distillation.step_settings(cfg, count),
                    {"teacher": teacher, "parent": parent, **_generic(generic), "loo": loo})


# --- SFT and the scorings of checkpoints -----------------------------------------------------------------

def sft_call(cfg: RunConfig, checkpoint: Output) -> StageCall:
    """`checkpoint` fine-tuned on data.sft (`<checkpoint>-SFT`)."""
    from pipeline.stages import run_sft

    return _checked(f"{checkpoint.name}-SFT", run_sft,
                    {"train": cfg.sft.train, "data": cfg.data.view("sft"), "hardware": cfg.hardware},
                    {"checkpoint": checkpoint})


def evaluate_call(cfg: RunConfig, *, teacher: Output, checkpoints: Mapping[str, Output],
                  generic: Output | None = None) -> StageCall:
    """The teacher and `checkpoints` (in the order to report) evaluated; the generic text (and its samples
    input) read only with evaluate.generic_nll."""
    from pipeline.stages import run_evaluate

    reads = ("eval", "generic") if cfg.evaluate.generic_nll else ("eval",)
    return _checked("evaluate", run_evaluate,
                    {"evaluate": cfg.evaluate, "data": cfg.data.view(*reads), "hardware": cfg.hardware},
                    {"teacher": teacher, "checkpoints": dict(checkpoints),
                     **(_generic(generic) if cfg.evaluate.generic_nll else {})}, is_checkpoint=False)


def quality_call(cfg: RunConfig, *, teacher: Output, checkpoint: Output, generic: Output | None = None) -> StageCall:
    """The ablation's scoring of one checkpoint (or of the teacher itself): `quality-<checkpoint>`."""
    from pipeline.stages import run_quality

    return _checked(f"quality-{checkpoint.name}", run_quality,
                    {"evaluate": cfg.evaluate, "data": cfg.data.view("eval", "generic"), "hardware": cfg.hardware},
                    {"teacher": teacher, "checkpoint": checkpoint, **_generic(generic)}, is_checkpoint=False)


__all__ = ["Distillation", "SAMPLES", "TEACHER_FINETUNED", "convert_call", "evaluate_call",
           "kl_call", "kl_step_call", "loo_call", "loo_step_call", "mmr_call", "quality_call",
           "samples_call", "samples_output", "sft_call", "start_call", "step_call", "teacher_call",
           "teacher_finetune_call", "teacher_output"]
