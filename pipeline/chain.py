"""The recipe's order of stages, once, for every way of running it.

`run_chain(cfg, execute, teacher, start=...)` walks the recipe: teacher -> LOO -> first conversion ->
(MMR -> step) for each later count -> SFT -> evaluate (`schedule.selection`: "mmr" the recipe's MMR ->
step, "kl" a KL-guided scoring -> kl_step, "loo" a loo_step by the teacher's LOO ranking). With a start
checkpoint (`start.path`: a hybrid, released or ours) it continues that hybrid's conversion instead:
teacher -> start -> (MMR -> step) for every count -> SFT -> evaluate (the start evaluated as `start` beside
the new checkpoints). Each stage is a
`StageCall`: the stage function, the config sections it reads and its inputs, built by `pipeline.recipe`
(the one place that knows which section feeds which argument; the ablation builds its calls there too).
`execute(call)` runs it and returns its Output (`pipeline.executor.Executor`, which flows/ wraps in Prefect
tasks and MLflow runs).
`run_local` runs the chain over a folder store without Prefect or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, checkpoint_name
from pipeline.executor import Executor, Output, Source, StageCall, local_source, work_root_for
from pipeline.recipe import (
    Distillation,
    convert_call,
    evaluate_call,
    kl_call,
    kl_step_call,
    loo_call,
    loo_step_call,
    mmr_call,
    samples_output,
    sft_call,
    start_call,
    step_call,
    teacher_output,
)
from pipeline.reporting import Reporter

UNTIL = ("teacher", "loo", "convert", "mmr", "steps", "sft", "evaluate")


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
    from pipeline.data.stage_data import distillation_source

    if until not in UNTIL:
        raise ConfigError(f"until={until!r} is not a stage; valid: {', '.join(UNTIL)}")
    sft_from = sft_input(cfg)
    out: dict[str, Output] = {}

    def run(call: StageCall) -> Output:
        out[call.name] = execute(call)
        return out[call.name]

    distillation = Distillation.of(cfg)
    teacher_out = teacher_output(cfg, execute, teacher, out)
    if until == "teacher":
        return out
    samples = samples_output(cfg, execute, teacher_out, out)
    distill_generic = samples if distillation_source(distillation.data) in ("generic", "mix") else None
    if cfg.start.path:  # continue a hybrid: it takes the place of LOO and the first conversion
        registered = run(start_call(cfg, start, teacher_out))
        check_start_counts(cfg, registered.n_mamba)
        if until in ("loo", "convert"):
            return out
        previous, later = registered, cfg.schedule.counts
    else:
        loo = run(loo_call(cfg, teacher_out))
        if until == "loo":
            return out
        previous = run(convert_call(cfg, distillation, teacher=teacher_out, loo=loo, generic=distill_generic))
        if until == "convert":
            return out
        later = cfg.schedule.counts[1:]
    checkpoints = [previous]
    selection = check_selection(cfg)
    for count in later:
        if selection == "mmr":
            mmr = run(mmr_call(cfg, distillation, teacher=teacher_out, parent=previous))
            if until == "mmr":
                return out
            previous = run(step_call(cfg, distillation, count, teacher=teacher_out, parent=previous, mmr=mmr))
        elif selection == "kl":
            kl = run(kl_call(cfg, distillation, teacher=teacher_out, parent=previous, generic=distill_generic))
            if until == "mmr":
                return out
            previous = run(kl_step_call(cfg, distillation, count, teacher=teacher_out, parent=previous, kl=kl,
                                        generic=distill_generic))
        else:  # the teacher's static LOO ranking: nothing to score
            if until == "mmr":
                return out
            previous = run(loo_step_call(cfg, distillation, count, teacher=teacher_out, parent=previous,
                                         loo=out["loo"], generic=distill_generic))
        checkpoints.append(previous)
    if until in ("mmr", "steps"):  # "mmr" with a one-count schedule: there is nothing to score
        return out
    checkpoints.append(run(sft_call(cfg, out[sft_from])))
    if until == "sft":
        return out
    run(evaluate_call(cfg, teacher=teacher_out, checkpoints={output.name: output for output in checkpoints},
                      generic=samples))
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


__all__ = ["UNTIL", "StageCall", "check_selection", "check_start_counts", "gguf_source", "local_teacher_source",
           "run_chain", "run_local", "sft_input"]
