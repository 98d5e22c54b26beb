"""The recipe's order of stages, once, for every way of running it.

`run_chain(cfg, execute, teacher, start=...)` walks the recipe: teacher -> LOO -> first conversion ->
(MMR -> step) for each later count -> SFT -> evaluate (`schedule.selection`: "mmr" the recipe's MMR ->
step, "kl" a KL-guided scoring -> kl_step, "loo" a loo_step by the teacher's LOO ranking). With a start
checkpoint (`start.path`: a hybrid, released or ours) it continues that hybrid's conversion instead:
teacher -> start -> (MMR -> step) for every count -> SFT -> evaluate (the start evaluated as `start` beside
the new checkpoints). Each stage is a
`StageCall`: the stage function, the config sections it reads (taken here from the RunConfig, the only
place that knows which section feeds which argument) and its inputs. `execute(call)` runs it and returns
its Output (`pipeline.executor.Executor`, which flows/ wraps in Prefect tasks and MLflow runs).
`run_local` runs the chain over a folder store without Prefect or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_MIXERS, ConfigError, RunConfig, checkpoint_name
from pipeline.executor import Executor, Output, Source, StageCall, local_source, work_root_for
from pipeline.stages.common import Reporter
from pipeline.stages.start import START

UNTIL = ("teacher", "loo", "convert", "mmr", "steps", "sft", "evaluate")


def distill_view(cfg: RunConfig):
    """The data a distillation (conversion, step, MMR trial) reads: the source data.distill_on names."""
    return cfg.data.distillation_view()


def mixer_settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """What a conversion stage reads of schedule.mixers and the gdn section, beyond its usual settings:
    nothing with the default mixers [mamba] (so Mamba-only runs keep their keys). The first conversion reads
    the first mixer (and gdn when that is "gdn"), MMR all mixers (and gdn when listed), a step gdn when
    listed (the settings of its new Gated DeltaNet layers)."""
    mixers = list(cfg.schedule.mixers)
    if mixers == DEFAULT_MIXERS:
        return {}
    if stage == "convert":
        return {"mixer": mixers[0], "gdn": cfg.gdn} if mixers[0] != "mamba" else {}
    if stage == "mmr":
        return {"mixers": mixers, **({"gdn": cfg.gdn} if "gdn" in mixers else {})}
    return {"gdn": cfg.gdn} if "gdn" in mixers else {}


def teacher_call(cfg: RunConfig, source: Source | None) -> StageCall:
    from pipeline.stages import import_teacher, run_teacher

    if cfg.teacher.path:
        if source is None:
            raise ConfigError("teacher.path is set but no teacher source was resolved")
        return StageCall("teacher", import_teacher, {"hardware": cfg.hardware}, {"source": source})
    kinds = ("distill", "generic") if cfg.teacher.demo.generic_every else ("distill",)
    return StageCall("teacher", run_teacher,
                     {"demo": cfg.teacher.demo, "data": cfg.data.view(*kinds), "hardware": cfg.hardware}, {})


TEACHER_FINETUNED = "teacher-ft"  # the output name of the fine-tuned teacher (teacher.finetune)


def teacher_output(cfg: RunConfig, execute: Callable[[StageCall], Output], source: Source | None,
                   outputs: dict[str, Output] | None = None) -> Output:
    """The run's teacher: the `teacher` stage's output, then, with teacher.finetune.enabled, that teacher
    fine-tuned on data.sft (`teacher-ft`), which every later stage distils from. Records each output in
    `outputs` by name."""
    from pipeline.stages import run_teacher_finetune

    outputs = {} if outputs is None else outputs
    first = teacher_call(cfg, source)
    first.check_signature()
    outputs["teacher"] = execute(first)
    if not cfg.teacher.finetune.enabled:
        return outputs["teacher"]
    tune = StageCall(TEACHER_FINETUNED, run_teacher_finetune,
                     {"train": cfg.teacher.finetune.train, "data": cfg.data.view("sft"), "hardware": cfg.hardware},
                     {"teacher": outputs["teacher"]})
    tune.check_signature()
    outputs[TEACHER_FINETUNED] = execute(tune)
    return outputs[TEACHER_FINETUNED]


SAMPLES = "teacher-samples"  # the output name of the teacher's own samples (data.generic=teacher)


def generic_input(cfg: RunConfig, execute: Callable[[StageCall], Output], teacher: Output,
                  outputs: dict[str, Output] | None = None) -> dict[str, Output]:
    """`{"generic": <the teacher's samples>}` for the stages that read generic text, when data.generic is
    "teacher" (the `samples` stage runs once, after the teacher); `{}` otherwise (they read data.generic)."""
    from pipeline.stages import run_samples

    if not cfg.data.samples_teacher:
        return {}
    call = StageCall(SAMPLES, run_samples, {"samples": cfg.data.samples, "hardware": cfg.hardware},
                     {"teacher": teacher}, is_checkpoint=False)
    call.check_signature()
    output = execute(call)
    if outputs is not None:
        outputs[SAMPLES] = output
    return {"generic": output}


def start_call(cfg: RunConfig, source: Source | None, teacher: Output) -> StageCall:
    """The start checkpoint registered in the store (checked against the teacher). Its content digest is
    what every later stage's key holds of it (they take its Output as their parent)."""
    from pipeline.stages import import_start

    if source is None:
        raise ConfigError("start.path is set but no start source was resolved")
    return StageCall(START, import_start, {"hardware": cfg.hardware}, {"source": source, "teacher": teacher})


def check_start_counts(cfg: RunConfig, n_mamba: int | None) -> None:
    """Every schedule count adds converted layers to the start checkpoint's `n_mamba` (its Mamba and Gated
    DeltaNet layers; None: not known yet)."""
    if n_mamba is not None and cfg.schedule.counts[0] <= n_mamba:
        raise ConfigError(f"schedule.counts {list(cfg.schedule.counts)}: start.path={cfg.start.path} already has "
                          f"{n_mamba} Mamba layers; every count must be larger")


def check_selection(cfg: RunConfig) -> str:
    """schedule.selection, checked against what the run has: "loo" needs the teacher's LOO ranking (not run
    when a start checkpoint takes its place); MMR trials cannot yet read the teacher's own samples, so a
    distillation on generic text or a mix with data.generic=teacher needs "loo" or "kl" for its later steps."""
    selection = cfg.schedule.selection
    if selection == "loo" and cfg.start.path:
        raise ConfigError(f"schedule.selection=loo orders the steps by the teacher's LOO ranking, which a run from "
                          f"start.path={cfg.start.path} does not compute: use schedule.selection=mmr or kl")
    later = cfg.schedule.counts if cfg.start.path else cfg.schedule.counts[1:]
    if (selection == "mmr" and later and cfg.data.samples_teacher
            and cfg.data.distill_on in ("generic", "mix")):
        raise ConfigError(f"data.distill_on={cfg.data.distill_on} with data.generic=teacher: the MMR trials cannot "
                          "read the teacher's samples yet; use schedule.selection=kl or loo for the later steps")
    return selection


def sft_input(cfg: RunConfig) -> str:
    """The checkpoint SFT starts from (sft.checkpoint, checked against the schedule)."""
    names = [checkpoint_name(count) for count in cfg.schedule.counts]
    chosen = names[-1] if cfg.sft.checkpoint == "last" else cfg.sft.checkpoint
    if chosen not in names:
        raise ConfigError(f"sft.checkpoint={cfg.sft.checkpoint!r} is not a checkpoint of schedule.counts "
                          f"{list(cfg.schedule.counts)}: choose one of {', '.join(['last', *names])}")
    return chosen


def run_chain(cfg: RunConfig, execute: Callable[[StageCall], Output], teacher: Source | None = None,
              until: str = "evaluate", start: Source | None = None) -> dict[str, Output]:
    """Walk the recipe up to and including `until` (`mmr` = the first MMR scoring, `steps` = every
    progressive step; with a start checkpoint `loo` and `convert` end at its registration); returns every
    output by name. `teacher`: the user's teacher (cfg.teacher.path); `start`: the start checkpoint
    (cfg.start.path). The MMR stages' worker processes (hardware.nproc > 1) live as long as the run: they
    are stopped when it ends, however it ends."""
    from pipeline.stages.workers import shutdown

    try:
        return _walk(cfg, execute, teacher, until, start)
    finally:
        shutdown()


def _walk(cfg: RunConfig, execute: Callable[[StageCall], Output], teacher: Source | None, until: str,
          start: Source | None) -> dict[str, Output]:
    from pipeline.stages import (
        run_convert,
        run_evaluate,
        run_kl,
        run_kl_step,
        run_loo,
        run_loo_step,
        run_mmr,
        run_sft,
        run_step,
    )
    from pipeline.data.stage_data import distill_kind

    if until not in UNTIL:
        raise ConfigError(f"until={until!r} is not a stage; valid: {', '.join(UNTIL)}")
    sft_from = sft_input(cfg)
    out: dict[str, Output] = {}

    def call(name: str, run: Callable, settings: dict[str, Any], inputs: dict[str, Any], is_checkpoint: bool = True):
        stage_call = StageCall(name, run, settings, inputs, is_checkpoint)
        stage_call.check_signature()
        out[name] = execute(stage_call)
        return out[name]

    hardware, seed, counts = cfg.hardware, cfg.seed, cfg.schedule.counts
    teacher_out = teacher_output(cfg, execute, teacher, out)
    if until == "teacher":
        return out
    generic = generic_input(cfg, execute, teacher_out, out)
    distill_generic = generic if distill_kind(distill_view(cfg)) in ("generic", "mix") else {}
    if cfg.start.path:  # continue a hybrid: it takes the place of LOO and the first conversion
        registered = start_call(cfg, start, teacher_out)
        registered.check_signature()
        out[START] = execute(registered)
        check_start_counts(cfg, out[START].n_mamba)
        if until in ("loo", "convert"):
            return out
        previous, checkpoints, later = START, [START], counts
    else:
        call("loo", run_loo, {"loo": cfg.loo, "data": cfg.data.view("eval", "distill"), "hardware": hardware,
                              "first_count": counts[0]}, {"teacher": teacher_out}, is_checkpoint=False)
        if until == "loo":
            return out
        previous = checkpoint_name(counts[0])
        call(previous, run_convert, {"train": cfg.first_train(), "mamba": cfg.mamba, "data": distill_view(cfg),
                                     "hardware": hardware, "seed": seed, "count": counts[0],
                                     **mixer_settings(cfg, "convert")},
             {"teacher": teacher_out, "loo": out["loo"], **distill_generic})
        if until == "convert":
            return out
        checkpoints, later = [previous], counts[1:]
    selection = check_selection(cfg)
    for count in later:
        name = checkpoint_name(count)
        step_settings = {"train": cfg.train, "data": distill_view(cfg), "hardware": hardware, "seed": seed,
                         "count": count}
        inputs = {"teacher": teacher_out, "parent": out[previous], **distill_generic}
        if selection == "mmr":
            mmr_name = f"mmr-{previous}"
            call(mmr_name, run_mmr, {"mmr": cfg.mmr, "data": distill_view(cfg), "hardware": hardware, "seed": seed,
                                     **mixer_settings(cfg, "mmr")},
                 {"teacher": teacher_out, "parent": out[previous]}, is_checkpoint=False)
            if until == "mmr":
                return out
            call(name, run_step, {**step_settings, **mixer_settings(cfg, "step")},
                 {"teacher": teacher_out, "parent": out[previous], "mmr": out[mmr_name]})
        elif selection == "kl":
            kl_name = f"kl-{previous}"
            call(kl_name, run_kl, {"train": cfg.mmr.train, "data": distill_view(cfg), "hardware": hardware,
                                   "seed": seed},
                 inputs, is_checkpoint=False)
            if until == "mmr":
                return out
            call(name, run_kl_step, step_settings, {**inputs, "kl": out[kl_name]})
        else:  # the teacher's static LOO ranking: nothing to score
            if until == "mmr":
                return out
            call(name, run_loo_step, step_settings, {**inputs, "loo": out["loo"]})
        checkpoints.append(name)
        previous = name
    if until in ("mmr", "steps"):  # "mmr" with a one-count schedule: there is nothing to score
        return out
    sft_name = f"{sft_from}-SFT"
    call(sft_name, run_sft, {"train": cfg.sft.train, "data": cfg.data.view("sft"), "hardware": hardware},
         {"checkpoint": out[sft_from]})
    checkpoints.append(sft_name)
    if until == "sft":
        return out
    reads = ("eval", "generic") if cfg.evaluate.generic_nll else ("eval",)
    call("evaluate", run_evaluate, {"evaluate": cfg.evaluate, "data": cfg.data.view(*reads), "hardware": hardware},
         {"teacher": teacher_out, "checkpoints": {name: out[name] for name in checkpoints},
          **(generic if cfg.evaluate.generic_nll else {})}, is_checkpoint=False)
    return out


def local_teacher_source(path: str, key: str = "teacher.path") -> Source:
    """A checkpoint given as `key` (teacher.path, start.path) that is not in a store: a folder on this
    machine (a path or file:// URI) or a GGUF file (teacher.path), digested by content, or a Hugging Face
    hub id (`pipeline.hub`), digested by its commit sha."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(path)
    if parsed.scheme.lower() not in ("", "file"):
        raise ConfigError(f"{key}={path!r}: run_local reads local folders; use `python -m flows.convert` "
                          "for s3:// checkpoints")
    folder = Path(unquote(parsed.netloc + parsed.path) if parsed.scheme else path).expanduser()
    if key == "teacher.path":
        from pipeline.model.gguf import GGUFError, find_gguf

        try:
            gguf = find_gguf(folder)
        except GGUFError as error:
            raise ConfigError(f"{key}={path!r}: {error}") from None
        if gguf is not None:
            return gguf_source(path, gguf)
    if not folder.is_dir():
        from pipeline.hub import hub_source, parse_hub_id

        if not parsed.scheme and parse_hub_id(path) is not None:  # org/name[@revision][/file.gguf]
            return hub_source(path, key)
        raise ConfigError(f"{key}={path!r} does not exist (a folder with config.json, weights and tokenizer"
                          + (", or a .gguf file" if key == "teacher.path" else "")
                          + ", or a hub id org/name[@revision])")
    return local_source(path, folder)


def gguf_source(uri: str, file: Path) -> Source:
    """A GGUF file as the teacher's Source: digested by the file's sha256, listed as its one file; the
    stage receives the file's path (it dequantises it)."""
    from pipeline.executor import folder_digest

    return Source(uri, folder_digest(file), lambda: file, (file.name,),
                  lambda name: (file.parent / name).read_bytes())


def run_local(cfg: RunConfig, root: str | Path | None = None, reporter: Reporter | None = None,
              until: str = "evaluate", work_root: str | Path | None = None) -> dict[str, Path]:
    """The chain over a folder store `<root>/<run_name>` (default root: storage.uri), without Prefect or
    MLflow; returns each output's folder by name. Same executor, keys and skipping as the flow."""
    from pipeline.store import LocalStore, open_store

    root = Path(root if root is not None else cfg.storage.uri)
    cache = Path(cfg.storage.cache_dir or ".cache")
    store = open_store(str(root / cfg.run_name), cache_dir=cache / "store",
                       retain_seconds=cfg.storage.retain_hours * 3600)
    if not isinstance(store, LocalStore):
        raise ConfigError(f"run_local writes to a folder, not {store.uri}: use `python -m flows.convert` for S3")
    work = Path(work_root) if work_root is not None else work_root_for(cache, store, cfg.run_name)
    teacher = local_teacher_source(cfg.teacher.path) if cfg.teacher.path else None
    start = local_teacher_source(cfg.start.path, "start.path") if cfg.start.path else None
    outputs = run_chain(cfg, Executor(store, work, reporter), teacher, until=until, start=start)
    return {name: store.root / name for name in outputs}


__all__ = ["UNTIL", "StageCall", "check_selection", "check_start_counts", "local_teacher_source", "mixer_settings",
           "run_chain", "run_local",
           "gguf_source", "sft_input", "start_call", "teacher_call", "teacher_output", "TEACHER_FINETUNED",
           "SAMPLES", "generic_input"]
