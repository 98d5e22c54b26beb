"""MIL-Mamba-Replacement scoring: how easily each remaining attention layer becomes Mamba.

For each attention layer of the parent hybrid: MIL-initialise that layer alone (swapped into the parent in
place: one mixer, not a copy of the model; `pipeline.convert.mamba_trial`), train only its new
mixer for `mmr.train.steps` steps of distillation from the teacher, and record the mean distillation loss
of the last `mmr.train.loss_window` steps. Low loss = easy to replace. Each finished trial is recorded in
`work_dir` (trials.json, replaced atomically), so a killed MMR stage resumes at the missing layers. Writes
mmr.json and mmr.png.

Fan-out (hardware.nproc = N > 1): the trials are independent, so N worker processes run them at once
(`pipeline.stages.workers`): started by the first MMR stage of the run and kept for the later ones, so
only the first stage pays for starting processes, importing torch and initialising a device. For each
stage every worker it uses loads teacher and parent once on its own device (CUDA: worker i on GPU i modulo
the GPUs there are; CPU: N processes, which is what the tests use), takes trials from the stage's queue
(longest first by their cost, steps x batch; equal costs, as today's trials all are, keep the candidates'
order) and releases both models when the stage's trials are done (their GPU memory is back before the next
step trains). Every trial is the same function with the same seed and batches as in the sequential path, so
a layer's score does not depend on which worker ran it, how many there are, or what the worker ran before
(on CPU equal to the sequential scores within float32 noise, see tests/stages/test_mmr_fanout.py);
hardware.nproc stays KEY_NEUTRAL. The stage's process only gathers: it records each score as it arrives,
forwards the workers' progress lines, logs each trial's curve into that trial's reporter when the trial has
finished (MLflow: its nested run), and notes each worker's start-up (from the stage's start to its models
loaded) in stage.json (`workers`) and as `mmr/worker_startup_s`. A worker that raises or dies fails the
stage in one line naming the worker, its device and the layer it was on; the workers are then stopped, and
the next stage starts new ones.
Not done: one trial spread over a group of GPUs (a parent too large for one GPU); each worker holds a
whole teacher and parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig, HardwareConfig, MMRConfig
from pipeline.convert import mamba_trial
from pipeline.evaluate.plots import bar_plot
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    StageError,
    distill_kind,
    load_model,
    load_tokenizer,
    metrics_callback,
    resolve_precision,
    stage,
    train_metrics,
    write_meta,
)
from pipeline.train import TrainConfig, train

MMR_FILE = "mmr.json"
TRIALS_FILE = "trials.json"  # in work_dir: {layer: score} of the finished trials


def rank_candidates(trials: dict[int, float]) -> list[dict]:
    """Trials sorted from easiest (lowest loss) to hardest; ties by layer index."""
    return [{"layer": layer, "loss": loss} for layer, loss in sorted(trials.items(), key=lambda kv: (kv[1], kv[0]))]


def score_layer(parent_model, teacher_model, stage_data: StageData, data: DataConfig, train_cfg: TrainConfig,
                precision: str, seed: int, layer: int, callback) -> float:
    """One MMR trial: the parent with `layer` swapped for a MIL-initialised Mamba mixer (no copy of the
    model), only that mixer trained; returns the trial's score (its final distillation loss)."""
    prefix = f"model.layers.{layer}.mixer."
    with mamba_trial(parent_model, layer, seed=seed) as student:
        result = train(
            student, stage_data.batch_source(distill_kind(data), train_cfg.batch_size, train_cfg.seed), train_cfg,
            teacher=teacher_model, callback=callback,
            trainable_filter=lambda name, _param: name.startswith(prefix), precision=precision,
        )
    return result.final_distill_loss


def _record(work_dir: Path, trials: dict[int, float]) -> None:
    """trials.json replaced atomically: a kill leaves the previous record or this one, never half of one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    temporary = work_dir / f".{TRIALS_FILE}.tmp"
    temporary.write_text(json.dumps(trials))
    os.replace(temporary, work_dir / TRIALS_FILE)


def _candidates(parent: str | Path) -> tuple[list[int], int]:
    """(attention layers, number of Mamba layers) of the parent checkpoint, read from its config files alone
    (the fan-out's stage process loads no model)."""
    from pipeline.model.config import ATTENTION, MAMBA
    from pipeline.model.layouts import MIL_CONFIG, LayoutError, layer_kinds, read_json
    from pipeline.stages.common import require_folder

    folder = require_folder(parent, "parent checkpoint")
    try:
        kinds = layer_kinds(read_json(folder / "config.json"),
                            read_json(folder / MIL_CONFIG) if (folder / MIL_CONFIG).is_file() else None)
    except (LayoutError, ValueError) as exc:
        raise StageError(f"parent checkpoint at {folder}: {exc}") from None
    return [i for i, kind in enumerate(kinds) if kind == ATTENTION], sum(kind == MAMBA for kind in kinds)


@stage("mmr", version=5)
def run_mmr(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher: str | Path,
            parent: str | Path, out_dir: str | Path, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    reporter = reporter or ConsoleReporter()
    started, out_dir, work_dir = time.time(), Path(out_dir), Path(work_dir)
    done_path = work_dir / TRIALS_FILE
    trials = {int(k): v for k, v in json.loads(done_path.read_text()).items()} if done_path.exists() else {}
    train_cfg = mmr.train
    if hardware.nproc > 1:
        candidates, n_mamba = _candidates(parent)
        workers = _fan_out(mmr, data, hardware, seed, teacher=teacher, parent=parent, work_dir=work_dir,
                           reporter=reporter, candidates=candidates, trials=trials)
    else:
        workers = {}
        teacher_model = load_model(teacher, hardware, "teacher")  # frozen: bf16 under bf16-mixed
        parent_model = load_model(parent, hardware, "parent checkpoint", fp32=True)  # fp32: its trial mixers train
        stage_data = StageData(data, load_tokenizer(teacher))
        candidates, n_mamba = parent_model.config.attention_layers, len(parent_model.config.mamba_layers)
        precision = resolve_precision(hardware)
        for layer in candidates:
            if layer in trials:
                reporter.progress(f"  mmr layer {layer}: {trials[layer]:.4f} (recorded)")
                continue
            with reporter.trial(f"layer-{layer}") as trial:
                loss = score_layer(parent_model, teacher_model, stage_data, data, train_cfg, precision, seed, layer,
                                   metrics_callback(trial, f"mmr layer {layer}"))
            trials[layer] = loss
            _record(work_dir, trials)
            reporter.log_metrics({"mmr/loss": loss}, step=layer)
            reporter.progress(f"  mmr layer {layer}: distillation loss {loss:.4f}")
    ranking = rank_candidates(trials)
    result = {"n_mamba": n_mamba, "steps": train_cfg.steps, "score_window": train_cfg.loss_window, "ranking": ranking}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MMR_FILE).write_text(json.dumps(result, indent=2) + "\n")
    bar_plot([trials[layer] for layer in candidates], [str(layer) for layer in candidates],
             title=f"MMR: distillation loss after {train_cfg.steps} steps (from H-{n_mamba})",
             ylabel="mean distillation loss", path=out_dir / "mmr.png")
    for name in (MMR_FILE, "mmr.png"):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "mmr", {"mmr": mmr, "data": data, "hardware": hardware, "seed": seed},
               parent=f"H-{n_mamba}", started=started, ranking=ranking, **({"workers": workers} if workers else {}))
    return result


# --- fan-out over worker processes (kept for the run: pipeline.stages.workers) ----------------------

@dataclass(frozen=True)
class _WorkerSetup:
    """How a worker process starts (equal setups share a pool): its device, or its CPU threads."""

    devices: tuple[str, ...]  # worker i computes on devices[i] ("cpu" or "cuda:<k>")
    threads: int | None  # CPU workers: torch threads each (the machine's cores shared out)

    def setup(self, index: int) -> None:
        import torch

        if self.devices[index].startswith("cuda"):
            torch.cuda.set_device(torch.device(self.devices[index]))  # "cuda" below is this worker's GPU
        elif self.threads:
            torch.set_num_threads(self.threads)


@dataclass
class _Loaded:
    teacher: object
    parent: object
    data: StageData
    precision: str


@dataclass
class _WorkerJob:
    """One MMR stage, as each worker runs it (picklable: configs and paths)."""

    mmr: MMRConfig
    data: DataConfig
    hardware: HardwareConfig
    seed: int
    teacher: str
    parent: str

    def load(self, index: int) -> _Loaded:
        """Teacher and parent once a stage, on this worker's device (the tokenised data the worker's
        process already holds from an earlier stage is reused: `StageData`'s process-wide cache)."""
        return _Loaded(teacher=load_model(self.teacher, self.hardware, "teacher"),
                       parent=load_model(self.parent, self.hardware, "parent checkpoint", fp32=True),
                       data=StageData(self.data, load_tokenizer(self.teacher)),
                       precision=resolve_precision(self.hardware))

    def run(self, loaded: _Loaded, task, report) -> float:
        layer = task
        return score_layer(loaded.parent, loaded.teacher, loaded.data, self.data, self.mmr.train, loaded.precision,
                           self.seed, layer, lambda metrics: report("metrics", dataclasses.asdict(metrics)))

    def release(self, loaded: _Loaded) -> None:
        """The models go, and their device memory with them (the next stage trains on these GPUs)."""
        import gc

        import torch

        loaded.teacher = loaded.parent = None
        gc.collect()
        if self.hardware.device == "cuda":
            torch.cuda.empty_cache()

    def cost(self, task) -> int:
        """What a trial costs, in sequences trained on (steps x batch): every trial of a stage costs the same
        today, so the queue keeps the candidates' order."""
        return self.mmr.train.steps * self.mmr.train.batch_size * self.mmr.train.grad_accum


def _resolved_hardware(hardware: HardwareConfig) -> tuple[HardwareConfig, tuple[str, ...]]:
    """hardware with device "auto" resolved here, once, so every worker and the error lines agree, and each
    worker's device: on CUDA, worker i on GPU i modulo the GPUs there are (more workers than GPUs share
    them), on CPU all on "cpu"."""
    import torch

    if hardware.device == "auto":
        hardware = dataclasses.replace(hardware, device="cuda" if torch.cuda.is_available() else "cpu")
    if hardware.device != "cuda":
        return hardware, ("cpu",) * hardware.nproc
    count = torch.cuda.device_count()
    if count == 0:
        raise StageError("hardware.device=cuda but no CUDA device is available")
    return hardware, tuple(f"cuda:{index % count}" for index in range(hardware.nproc))


def _fan_out(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher, parent,
             work_dir: Path, reporter: Reporter, candidates: list[int], trials: dict[int, float]) -> dict:
    """Score the candidates not in `trials` on the run's hardware.nproc worker processes (started by the first
    stage that needs them, reused by the later ones); `trials` is filled in (and recorded in work_dir) as the
    scores arrive. Returns the workers' start-up record (for stage.json), {} when nothing was left to score."""
    from pipeline.stages.workers import WorkerFailure, pool_for
    from pipeline.train.loop import StepMetrics

    for layer in candidates:
        if layer in trials:
            reporter.progress(f"  mmr layer {layer}: {trials[layer]:.4f} (recorded)")
    todo = [layer for layer in candidates if layer not in trials]
    if not todo:
        return {}
    hardware, devices = _resolved_hardware(hardware)
    count = min(hardware.nproc, len(todo))
    threads = hardware.threads or max(1, (os.cpu_count() or 1) // hardware.nproc)
    job = _WorkerJob(mmr, data, hardware, seed, str(teacher), str(parent))
    pool = pool_for(hardware.nproc, _WorkerSetup(devices, threads if hardware.device != "cuda" else None))
    reused = pool.stages_run > 0
    shared = " (sharing GPUs)" if hardware.device == "cuda" and len(set(devices[:count])) < count else ""
    reporter.progress(f"  mmr: {len(todo)} trials on {count} worker processes ({', '.join(devices[:count])}){shared}, "
                      f"{'reused from an earlier stage' if reused else 'started now'}")
    curves: dict[int, list[dict]] = {layer: [] for layer in todo}

    def where(index: int) -> str:
        return f"mmr worker {index} ({devices[index]})"

    def handle(kind: str, index: int, layer, payload) -> None:
        if kind == "ready":
            reporter.progress(f"  mmr: {where(index)} loaded teacher and parent in {payload:.1f} s")
        elif kind == "start":
            reporter.progress(f"  mmr layer {layer}: {where(index)}, pid {payload}")
        elif kind == "metrics":
            curves[layer].append(payload)
            metrics = StepMetrics(**payload)
            reporter.progress(f"  mmr layer {layer} step {metrics.step}: loss {metrics.loss:.4f} "
                              f"lr {metrics.lr:.2e} {metrics.tokens_per_second:,.0f} tok/s ({where(index)})")
        elif kind == "done":
            with reporter.trial(f"layer-{layer}") as trial:  # the curve, into the trial's own run
                for record in curves.pop(layer):
                    trial.log_metrics(train_metrics(StepMetrics(**record)), step=record["step"])
            trials[layer] = payload
            _record(work_dir, trials)
            reporter.log_metrics({"mmr/loss": payload}, step=layer)
            reporter.progress(f"  mmr layer {layer}: distillation loss {payload:.4f} ({where(index)})")

    try:
        timing = pool.run_stage(job, todo, handle, cost=job.cost, workers=count)
    except WorkerFailure as failure:
        if failure.message is not None:
            on = f"on layer {failure.task}" if failure.task is not None else "while loading the teacher and parent"
            raise StageError(f"{where(failure.index)} failed {on}: {failure.message}") from None
        on = f"during layer {failure.task}" if failure.task is not None else "before taking a layer"
        raise StageError(f"{where(failure.index)} {failure.how()} {on}") from None
    startup = {str(index): round(seconds, 3) for index, seconds in sorted(timing.ready_s.items())}
    reporter.progress(f"  mmr: worker start-up {', '.join(f'{timing.ready_s[i]:.1f} s' for i in sorted(timing.ready_s))} "
                      f"({'reused workers' if reused else 'started for this stage'})")
    reporter.log_metrics({"mmr/worker_startup_s": max(timing.ready_s.values())})
    return {"worker_startup_s": startup, "workers_reused": reused}


__all__ = ["MMR_FILE", "TRIALS_FILE", "rank_candidates", "run_mmr", "score_layer"]
