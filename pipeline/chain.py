"""The recipe's order of stages, once, for every way of running it.

`run_chain(cfg, execute)` walks the recipe: teacher -> LOO ->
first conversion -> (MMR -> step) for each later count -> SFT -> evaluate. Each stage is described by a
`StageCall` (name, stage, inputs, the config sections it reads, and the function that runs it on local
folders); `execute(call, inputs)` runs it and returns a handle to its output. `LocalExecutor` runs calls
in folders with skip-if-complete; the Prefect flow (flows/) supplies an executor that adds the store,
MLflow and caching. The sequencing lives here only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, checkpoint_name, to_plain
from pipeline.stages.common import STAGE_META, ConsoleReporter, Reporter


@dataclass
class StageCall:
    name: str  # output name: "teacher", "loo", "H-4", "mmr-H-4", "H-5-SFT", "evaluate"
    stage: str  # one of pipeline.config.STAGES
    inputs: dict[str, Any]  # role -> handle returned by execute() for an earlier call
    config: dict[str, Any]  # the part of the resolved config this stage reads (cache key)
    run: Callable[..., dict]  # run(input_dirs: dict[str, Path], out_dir: Path, work_dir: Path, reporter)
    is_checkpoint: bool = True  # a model folder (vs. a table of results)
    extra: dict[str, Any] = field(default_factory=dict)


def stage_config(cfg: RunConfig, stage: str, **more: Any) -> dict[str, Any]:
    """The config sections a stage reads (with `more`), plain, for digests and MLflow params."""
    plain = to_plain(cfg)
    common = {"seed": plain["seed"], "data": plain["data"], "precision": plain["hardware"]["precision"]}
    sections = {
        "teacher": ["teacher"],
        "loo": ["loo"],
        "convert": ["mamba", "train"],
        "mmr": ["mmr", "train"],
        "step": ["mamba", "train"],
        "sft": ["sft"],
        "evaluate": ["evaluate"],
    }[stage]
    return {**common, **{key: plain[key] for key in sections}, **more}


UNTIL = ("teacher", "loo", "convert", "mmr", "steps", "sft", "evaluate")


def run_chain(cfg: RunConfig, execute: Callable[[StageCall], Any], until: str = "evaluate") -> dict[str, Any]:
    """Walk the recipe up to and including `until` (`mmr` = the first MMR scoring, `steps` = every
    progressive step); returns every output's handle by name."""
    from pipeline.stages import run_convert, run_evaluate, run_loo, run_mmr, run_sft, run_step, run_teacher

    if until not in UNTIL:
        raise ValueError(f"until={until!r} is not a stage; valid: {', '.join(UNTIL)}")
    out: dict[str, Any] = {}
    out["teacher"] = execute(StageCall(
        "teacher", "teacher", {}, stage_config(cfg, "teacher"),
        lambda dirs, out_dir, work_dir, rep: run_teacher(cfg, out_dir, work_dir=work_dir, reporter=rep),
    ))
    if until == "teacher":
        return out
    out["loo"] = execute(StageCall(
        "loo", "loo", {"teacher": out["teacher"]}, stage_config(cfg, "loo", first=cfg.schedule.counts[0]),
        lambda dirs, out_dir, work_dir, rep: run_loo(cfg, dirs["teacher"], out_dir, reporter=rep),
        is_checkpoint=False,
    ))
    if until == "loo":
        return out
    first = checkpoint_name(cfg.schedule.counts[0])
    out[first] = execute(StageCall(
        first, "convert", {"teacher": out["teacher"], "loo": out["loo"]},
        stage_config(cfg, "convert", count=cfg.schedule.counts[0]),
        lambda dirs, out_dir, work_dir, rep: run_convert(cfg, dirs["teacher"], dirs["loo"], out_dir,
                                                         work_dir=work_dir, reporter=rep),
    ))
    if until == "convert":
        return out
    checkpoints, previous = [first], first
    for count in cfg.schedule.counts[1:]:
        mmr_name = f"mmr-{previous}"
        out[mmr_name] = execute(StageCall(
            mmr_name, "mmr", {"teacher": out["teacher"], "parent": out[previous]}, stage_config(cfg, "mmr"),
            lambda dirs, out_dir, work_dir, rep: run_mmr(cfg, dirs["teacher"], dirs["parent"], out_dir,
                                                         work_dir=work_dir, reporter=rep),
            is_checkpoint=False,
        ))
        if until == "mmr":
            return out
        name = checkpoint_name(count)
        out[name] = execute(StageCall(
            name, "step", {"teacher": out["teacher"], "parent": out[previous], "mmr": out[mmr_name]},
            stage_config(cfg, "step", count=count),
            lambda dirs, out_dir, work_dir, rep, count=count: run_step(
                cfg, dirs["teacher"], dirs["parent"], dirs["mmr"], count, out_dir, work_dir=work_dir, reporter=rep),
        ))
        checkpoints.append(name)
        previous = name
    if until in ("mmr", "steps"):  # "mmr" with a one-count schedule: there is nothing to score
        return out
    chosen = previous if cfg.sft.checkpoint == "last" else cfg.sft.checkpoint
    if chosen not in checkpoints:
        raise ValueError(f"sft.checkpoint={cfg.sft.checkpoint!r} is not a checkpoint of this schedule: {checkpoints}")
    sft_name = f"{chosen}-SFT"
    out[sft_name] = execute(StageCall(
        sft_name, "sft", {"checkpoint": out[chosen]}, stage_config(cfg, "sft"),
        lambda dirs, out_dir, work_dir, rep: run_sft(cfg, dirs["checkpoint"], out_dir, work_dir=work_dir,
                                                     reporter=rep),
    ))
    checkpoints.append(sft_name)
    if until == "sft":
        return out
    out["evaluate"] = execute(StageCall(
        "evaluate", "evaluate", {"teacher": out["teacher"], **{name: out[name] for name in checkpoints}},
        stage_config(cfg, "evaluate", checkpoints=checkpoints),
        lambda dirs, out_dir, work_dir, rep: run_evaluate(
            cfg, dirs["teacher"], {name: dirs[name] for name in checkpoints}, out_dir, reporter=rep),
        is_checkpoint=False,
    ))
    return out


class LocalExecutor:
    """Runs each call into `<root>/<run_name>/<name>`; a folder with its stage.json is complete and skipped.

    Outputs are written into a temporary folder and renamed into place when the stage returns, so an
    interrupted stage never looks complete; its resumable state stays in `<root>/<run_name>/.work/<name>`.
    """

    def __init__(self, cfg: RunConfig, root: str | Path, reporter: Reporter | None = None) -> None:
        self.root = Path(root) / cfg.run_name
        self.reporter = reporter or ConsoleReporter()
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def __call__(self, call: StageCall) -> Path:
        out_dir = self.root / call.name
        if (out_dir / STAGE_META).is_file():
            self.reporter.progress(f"[{call.name}] complete, skipped")
            self.skipped.append(call.name)
            return out_dir
        work_dir = self.root / ".work" / call.name
        staging = self.root / ".work" / f"{call.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.reporter.progress(f"[{call.name}] {call.stage} ...")
        started = time.time()
        call.run({role: Path(handle) for role, handle in call.inputs.items()}, staging, work_dir, self.reporter)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        self.reporter.progress(f"[{call.name}] done in {time.time() - started:.0f}s")
        self.ran.append(call.name)
        return out_dir


def run_local(cfg: RunConfig, root: str | Path | None = None, reporter: Reporter | None = None,
              until: str = "evaluate") -> dict[str, Path]:
    """The chain in local folders (no Prefect, store or MLflow); returns each output's folder by name."""
    executor = LocalExecutor(cfg, root if root is not None else cfg.storage.uri, reporter)
    return run_chain(cfg, executor, until=until)


def read_summary(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


__all__ = ["LocalExecutor", "StageCall", "read_summary", "run_chain", "run_local", "stage_config"]
