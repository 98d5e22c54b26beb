"""MIL-Mamba-Replacement scoring: how easily each remaining attention layer becomes Mamba.

For each attention layer of the parent hybrid: MIL-initialise that layer alone (swapped into the parent in
place: one mixer, not a copy of the model; `pipeline.convert.mamba_trial`), train only its new
mixer for `mmr.train.steps` steps of distillation from the teacher, and record the mean distillation loss
of the last `mmr.train.loss_window` steps. Low loss = easy to replace. Each finished trial is recorded in
`work_dir` (trials.json, replaced atomically), so a killed MMR stage resumes at the missing layers. Writes
mmr.json and mmr.png.

Fan-out (hardware.nproc = N > 1): the trials are independent, so N worker processes run them at once, each
loading teacher and parent once on its own device (CUDA: one GPU a worker, `cuda:<i>`; CPU: N processes,
which is what the tests use) and taking layers from a shared queue. Every trial is the same function with
the same seed and batches as in the sequential path, so a layer's score does not depend on which worker ran
it or how many there are (on CPU equal to the sequential scores within float32 noise, see
tests/stages/test_mmr_fanout.py); hardware.nproc stays KEY_NEUTRAL. The stage's process only gathers:
it records each score as it arrives, forwards the workers' progress lines, and logs each trial's curve
into that trial's reporter when the trial has finished (MLflow: its nested run). A worker that raises or
dies fails the stage in one line naming the worker, its device and the layer it was on.
Not done: one trial spread over a group of GPUs (a parent too large for one GPU); each worker holds a
whole teacher and parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
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
        _fan_out(mmr, data, hardware, seed, teacher=teacher, parent=parent, work_dir=work_dir, reporter=reporter,
                 candidates=candidates, trials=trials)
    else:
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
               parent=f"H-{n_mamba}", started=started, ranking=ranking)
    return result


# --- fan-out over worker processes ---------------------------------------------------------------

@dataclass
class _WorkerJob:
    """What a worker needs (picklable: configs and paths)."""

    mmr: MMRConfig
    data: DataConfig
    hardware: HardwareConfig
    seed: int
    teacher: str
    parent: str
    threads: int | None  # CPU workers: torch threads each (the machine's cores shared out)


def _device_name(hardware: HardwareConfig, index: int) -> str:
    return f"cuda:{index}" if hardware.device == "cuda" else "cpu"


def _resolved_hardware(hardware: HardwareConfig) -> HardwareConfig:
    """hardware with device "auto" resolved here, once, so every worker and the error lines agree."""
    import torch

    if hardware.device == "auto":
        hardware = dataclasses.replace(hardware, device="cuda" if torch.cuda.is_available() else "cpu")
    if hardware.device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise StageError("hardware.device=cuda but no CUDA device is available")
        if hardware.nproc > count:
            raise StageError(f"hardware.nproc={hardware.nproc} but this machine has {count} CUDA devices "
                             "(MMR runs one trial a GPU)")
    return hardware


def _worker(job: _WorkerJob, index: int, tasks, results) -> None:
    """One worker process: load teacher and parent once on its device, then score layers from `tasks`
    until a None; every message to `results` is (kind, worker index, layer, payload)."""
    layer = None
    stage_pid = os.getppid()
    try:
        import torch

        if job.hardware.device == "cuda":
            torch.cuda.set_device(index)  # "cuda" below is this worker's GPU
        elif job.threads:
            torch.set_num_threads(job.threads)
        teacher_model = load_model(job.teacher, job.hardware, "teacher")
        parent_model = load_model(job.parent, job.hardware, "parent checkpoint", fp32=True)
        stage_data = StageData(job.data, load_tokenizer(job.teacher))
        precision = resolve_precision(job.hardware)

        def callback(metrics) -> None:
            if os.getppid() != stage_pid:  # the stage's process is gone: stop, do not keep a GPU busy
                raise SystemExit(1)
            results.put(("metrics", index, layer, dataclasses.asdict(metrics)))

        while (layer := tasks.get()) is not None:
            results.put(("start", index, layer, os.getpid()))
            loss = score_layer(parent_model, teacher_model, stage_data, job.data, job.mmr.train, precision, job.seed,
                               layer, callback)
            results.put(("done", index, layer, loss))
    except BaseException as exc:
        results.put(("error", index, layer, f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"))
        raise SystemExit(1) from None


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _fan_out(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher, parent,
             work_dir: Path, reporter: Reporter, candidates: list[int], trials: dict[int, float]) -> None:
    """Score the candidates not in `trials` on hardware.nproc worker processes; `trials` is filled in (and
    recorded in work_dir) as the scores arrive."""
    import multiprocessing

    from pipeline.train.loop import StepMetrics

    for layer in candidates:
        if layer in trials:
            reporter.progress(f"  mmr layer {layer}: {trials[layer]:.4f} (recorded)")
    todo = [layer for layer in candidates if layer not in trials]
    if not todo:
        return
    hardware = _resolved_hardware(hardware)
    count = min(hardware.nproc, len(todo))
    threads = hardware.threads or max(1, (os.cpu_count() or 1) // count)
    job = _WorkerJob(mmr, data, hardware, seed, str(teacher), str(parent), threads)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; the same on CPU
    tasks, results = context.Queue(), context.Queue()
    for layer in todo:
        tasks.put(layer)
    for _ in range(count):
        tasks.put(None)
    workers = [context.Process(target=_worker, args=(job, index, tasks, results), name=f"mmr-worker-{index}",
                               daemon=True) for index in range(count)]
    reporter.progress(f"  mmr: {len(todo)} trials on {count} worker processes "
                      f"({', '.join(_device_name(hardware, i) for i in range(count))})")
    for worker in workers:
        worker.start()
    current: dict[int, int] = {}  # worker -> the layer it is on
    curves: dict[int, list[dict]] = {layer: [] for layer in todo}

    def handle(message) -> None:
        kind, index, layer, payload = message
        where = f"mmr worker {index} ({_device_name(hardware, index)})"
        if kind == "error":
            on = f"on layer {layer}" if layer is not None else "while loading the teacher and parent"
            raise StageError(f"{where} failed {on}: {payload}")
        if kind == "start":
            current[index] = layer
            reporter.progress(f"  mmr layer {layer}: {where}, pid {payload}")
        elif kind == "metrics":
            curves[layer].append(payload)
            metrics = StepMetrics(**payload)
            reporter.progress(f"  mmr layer {layer} step {metrics.step}: loss {metrics.loss:.4f} "
                              f"lr {metrics.lr:.2e} {metrics.tokens_per_second:,.0f} tok/s ({where})")
        elif kind == "done":
            current.pop(index, None)
            with reporter.trial(f"layer-{layer}") as trial:  # the curve, into the trial's own run
                for record in curves.pop(layer):
                    trial.log_metrics(train_metrics(StepMetrics(**record)), step=record["step"])
            trials[layer] = payload
            _record(work_dir, trials)
            reporter.log_metrics({"mmr/loss": payload}, step=layer)
            reporter.progress(f"  mmr layer {layer}: distillation loss {payload:.4f} ({where})")

    try:
        while any(layer not in trials for layer in todo):
            try:
                handle(results.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            for index, worker in enumerate(workers):
                if worker.is_alive() or worker.exitcode == 0:
                    continue
                while True:  # its last messages (an "error" names the exception) come first
                    try:
                        handle(results.get(timeout=0.5))
                    except queue.Empty:
                        break
                on = f"during layer {current[index]}" if index in current else "before taking a layer"
                raise StageError(f"mmr worker {index} ({_device_name(hardware, index)}) "
                                 f"{_how_it_ended(worker.exitcode)} {on}")
            if not any(worker.is_alive() for worker in workers):
                missing = [layer for layer in todo if layer not in trials]
                raise StageError(f"mmr workers all exited with layers {missing} unscored")
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=30)


__all__ = ["MMR_FILE", "TRIALS_FILE", "rank_candidates", "run_mmr", "score_layer"]
