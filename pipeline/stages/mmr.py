"""MIL-Mamba-Replacement scoring: how easily each remaining attention layer becomes Mamba (or Gated DeltaNet).

For each attention layer of the parent hybrid, and each mixer of `schedule.mixers` (default: Mamba alone):
initialise that layer alone as that mixer from its attention (swapped into the parent in place: one mixer,
not a copy of the model; `pipeline.convert.mamba_trial` / `gdn_trial`), train only its new mixer for
`mmr.train.steps` steps of distillation from the teacher, and record the mean distillation loss of the last
`mmr.train.loss_window` steps. Low loss = easy to replace. Each finished trial is recorded in `work_dir`
(trials.json, replaced atomically), so a killed MMR stage resumes at the missing trials. Writes mmr.json
(the (layer, mixer) pairs from easiest to hardest; `choose_conversions` turns them into a step's layers
and their mixers) and mmr.png (one bar a pair). With the default mixers both files are exactly what they
were before Gated DeltaNet existed.

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

from pipeline.config import DEFAULT_MIXERS, DataConfig, GDNConfig, HardwareConfig, MMRConfig
from pipeline.convert import gdn_trial, mamba_trial
from pipeline.evaluate.plots import bar_plot, grouped_bar_plot
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


# --- (layer, mixer) pairs: what MMR scores when schedule.mixers lists more than Mamba ---------------------

def mmr_candidates(layers: list[int], mixers: list[str]) -> list[tuple[int, str]]:
    """Every (attention layer, mixer) pair a stage scores, layer by layer in the order of `mixers`."""
    return [(layer, mixer) for layer in layers for mixer in mixers]


def trial_key(layer: int, mixer: str) -> str:
    """The key of a trial in trials.json: the layer alone for Mamba (as it always was), "layer:mixer" else."""
    return str(layer) if mixer == "mamba" else f"{layer}:{mixer}"


def parse_trial_key(key: str) -> tuple[int, str]:
    layer, _, mixer = str(key).partition(":")
    return int(layer), mixer or "mamba"


def trial_label(layer: int, mixer: str) -> str:
    """How progress lines and tracking runs name a trial ("layer 3", "layer 3 gdn")."""
    return f"layer {layer}" if mixer == "mamba" else f"layer {layer} {mixer}"


def rank_pairs(trials: dict[tuple[int, str], float], mixers: list[str]) -> list[dict]:
    """(layer, mixer) trials from easiest (lowest loss) to hardest; ties by layer, then the order of `mixers`."""
    order = {mixer: index for index, mixer in enumerate(mixers)}
    ranked = sorted(trials.items(), key=lambda kv: (kv[1], kv[0][0], order.get(kv[0][1], len(order))))
    return [{"layer": layer, "mixer": mixer, "loss": loss} for (layer, mixer), loss in ranked]


def choose_conversions(ranking: list[dict], needed: int) -> dict[int, str]:
    """The next `needed` layers and their mixers from an MMR ranking (easiest first): each pair in turn,
    a layer taken once, with the mixer of its lowest-scoring pair (an entry without "mixer" is Mamba)."""
    chosen: dict[int, str] = {}
    for entry in ranking:
        if len(chosen) == needed:
            break
        chosen.setdefault(int(entry["layer"]), entry.get("mixer", "mamba"))
    return chosen


def score_layer(parent_model, teacher_model, stage_data: StageData, data: DataConfig, train_cfg: TrainConfig,
                precision: str, seed: int, layer: int, callback, mixer: str = "mamba",
                gdn: GDNConfig | None = None) -> float:
    """One MMR trial: the parent with `layer` swapped for a new mixer initialised from its attention (MIL
    Mamba, or Gated DeltaNet with `gdn`'s settings; no copy of the model), only that mixer trained; returns
    the trial's score (its final distillation loss)."""
    prefix = f"model.layers.{layer}.mixer."
    if mixer == "gdn":
        trial = gdn_trial(parent_model, layer, gdn_options=None if gdn is None else {"conv_kernel": gdn.d_conv},
                          seed=seed)
    else:
        trial = mamba_trial(parent_model, layer, seed=seed)
    with trial as student:
        result = train(
            student, stage_data.batch_source(distill_kind(data), train_cfg.batch_size, train_cfg.seed), train_cfg,
            teacher=teacher_model, callback=callback,
            trainable_filter=lambda name, _param: name.startswith(prefix), precision=precision,
        )
    return result.final_distill_loss


def _record(work_dir: Path, trials: dict[tuple[int, str], float]) -> None:
    """trials.json replaced atomically: a kill leaves the previous record or this one, never half of one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    temporary = work_dir / f".{TRIALS_FILE}.tmp"
    temporary.write_text(json.dumps({trial_key(*pair): loss for pair, loss in trials.items()}))
    os.replace(temporary, work_dir / TRIALS_FILE)


def _candidates(parent: str | Path) -> tuple[list[int], int, int]:
    """(attention layers, number of Mamba layers, number of Gated DeltaNet layers) of the parent checkpoint,
    read from its config files alone (the fan-out's stage process loads no model)."""
    from pipeline.model.config import ATTENTION, GDN, MAMBA
    from pipeline.model.layouts import MIL_CONFIG, LayoutError, layer_kinds, read_json
    from pipeline.stages.common import require_folder

    folder = require_folder(parent, "parent checkpoint")
    try:
        kinds = layer_kinds(read_json(folder / "config.json"),
                            read_json(folder / MIL_CONFIG) if (folder / MIL_CONFIG).is_file() else None)
    except (LayoutError, ValueError) as exc:
        raise StageError(f"parent checkpoint at {folder}: {exc}") from None
    return ([i for i, kind in enumerate(kinds) if kind == ATTENTION], sum(kind == MAMBA for kind in kinds),
            sum(kind == GDN for kind in kinds))


def mmr_table(trials: dict[tuple[int, str], float], mixers: list[str], n_mamba: int, n_gdn: int,
              train_cfg: TrainConfig) -> dict:
    """mmr.json: with the default mixers and a parent without Gated DeltaNet, exactly the Mamba-only table
    (no "mixer" fields); else each entry names its mixer and the table its mixers and Gated DeltaNet count."""
    default = list(mixers) == DEFAULT_MIXERS
    if default:
        ranking = rank_candidates({layer: loss for (layer, _mixer), loss in trials.items()})
    else:
        ranking = rank_pairs(trials, mixers)
    result = {"n_mamba": n_mamba, "steps": train_cfg.steps, "score_window": train_cfg.loss_window, "ranking": ranking}
    if not default:
        result["mixers"] = list(mixers)
    if n_gdn or not default:
        result["n_gdn"] = n_gdn
    return result


def _plot(trials: dict[tuple[int, str], float], layers: list[int], mixers: list[str], title: str, path: Path) -> None:
    if list(mixers) == DEFAULT_MIXERS:  # the Mamba-only plot, as it always was
        bar_plot([trials[(layer, "mamba")] for layer in layers], [str(layer) for layer in layers], title=title,
                 ylabel="mean distillation loss", path=path)
        return
    grouped_bar_plot({mixer: [trials.get((layer, mixer)) for layer in layers] for mixer in mixers},
                     [str(layer) for layer in layers], title=title, ylabel="mean distillation loss", path=path)


@stage("mmr", version=4)
def run_mmr(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, mixers: list[str] | None = None,
            gdn: GDNConfig | None = None, *, teacher: str | Path, parent: str | Path, out_dir: str | Path,
            work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """`mixers` (schedule.mixers) and `gdn` are given only by a run whose mixers are not the default [mamba],
    so Mamba-only runs keep their keys (and write what they always wrote)."""
    reporter = reporter or ConsoleReporter()
    mixers = list(mixers or DEFAULT_MIXERS)
    started, out_dir, work_dir = time.time(), Path(out_dir), Path(work_dir)
    done_path = work_dir / TRIALS_FILE
    trials = ({parse_trial_key(k): v for k, v in json.loads(done_path.read_text()).items()}
              if done_path.exists() else {})
    train_cfg = mmr.train
    if hardware.nproc > 1:
        layers, n_mamba, n_gdn = _candidates(parent)
        _fan_out(mmr, data, hardware, seed, teacher=teacher, parent=parent, work_dir=work_dir, reporter=reporter,
                 candidates=mmr_candidates(layers, mixers), trials=trials, gdn=gdn)
    else:
        teacher_model = load_model(teacher, hardware, "teacher")  # frozen: bf16 under bf16-mixed
        parent_model = load_model(parent, hardware, "parent checkpoint", fp32=True)  # fp32: its trial mixers train
        stage_data = StageData(data, load_tokenizer(teacher))
        config = parent_model.config
        layers, n_mamba, n_gdn = config.attention_layers, len(config.mamba_layers), len(config.gdn_layers)
        precision = resolve_precision(hardware)
        for layer, mixer in mmr_candidates(layers, mixers):
            label = trial_label(layer, mixer)
            if (layer, mixer) in trials:
                reporter.progress(f"  mmr {label}: {trials[(layer, mixer)]:.4f} (recorded)")
                continue
            with reporter.trial(label.replace(" ", "-")) as trial:
                loss = score_layer(parent_model, teacher_model, stage_data, data, train_cfg, precision, seed, layer,
                                   metrics_callback(trial, f"mmr {label}"), mixer=mixer, gdn=gdn)
            trials[(layer, mixer)] = loss
            _record(work_dir, trials)
            reporter.log_metrics({"mmr/loss" if mixer == "mamba" else f"mmr/loss_{mixer}": loss}, step=layer)
            reporter.progress(f"  mmr {label}: distillation loss {loss:.4f}")
    result = mmr_table(trials, mixers, n_mamba, n_gdn, train_cfg)
    ranking = result["ranking"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MMR_FILE).write_text(json.dumps(result, indent=2) + "\n")
    _plot(trials, layers, mixers, f"MMR: distillation loss after {train_cfg.steps} steps (from H-{n_mamba + n_gdn})",
          out_dir / "mmr.png")
    for name in (MMR_FILE, "mmr.png"):
        reporter.log_artifact(out_dir / name)
    settings = {"mmr": mmr, "data": data, "hardware": hardware, "seed": seed}
    if mixers != DEFAULT_MIXERS:
        settings.update(mixers=mixers, gdn=gdn)
    write_meta(out_dir, "mmr", settings, parent=f"H-{n_mamba + n_gdn}", started=started, ranking=ranking)
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
    gdn: GDNConfig | None = None  # the settings of Gated DeltaNet trials


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
    """One worker process: load teacher and parent once on its device, then score (layer, mixer) pairs from
    `tasks` until a None; every message to `results` is (kind, worker index, (layer, mixer), payload)."""
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
                               layer[0], callback, mixer=layer[1], gdn=job.gdn)
            results.put(("done", index, layer, loss))
    except BaseException as exc:
        results.put(("error", index, layer, f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"))
        raise SystemExit(1) from None


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _fan_out(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher, parent,
             work_dir: Path, reporter: Reporter, candidates: list[tuple[int, str]],
             trials: dict[tuple[int, str], float], gdn: GDNConfig | None = None) -> None:
    """Score the (layer, mixer) candidates not in `trials` on hardware.nproc worker processes; `trials` is
    filled in (and recorded in work_dir) as the scores arrive."""
    import multiprocessing

    from pipeline.train.loop import StepMetrics

    for layer in candidates:
        if layer in trials:
            reporter.progress(f"  mmr {trial_label(*layer)}: {trials[layer]:.4f} (recorded)")
    todo = [layer for layer in candidates if layer not in trials]
    if not todo:
        return
    hardware = _resolved_hardware(hardware)
    count = min(hardware.nproc, len(todo))
    threads = hardware.threads or max(1, (os.cpu_count() or 1) // count)
    job = _WorkerJob(mmr, data, hardware, seed, str(teacher), str(parent), threads, gdn)
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
    current: dict[int, tuple[int, str]] = {}  # worker -> the (layer, mixer) it is on
    curves: dict[tuple[int, str], list[dict]] = {pair: [] for pair in todo}

    def handle(message) -> None:
        kind, index, pair, payload = message
        pair = tuple(pair) if pair is not None else None  # (layer, mixer)
        label = trial_label(*pair) if pair is not None else None
        where = f"mmr worker {index} ({_device_name(hardware, index)})"
        if kind == "error":
            on = f"on {label}" if pair is not None else "while loading the teacher and parent"
            raise StageError(f"{where} failed {on}: {payload}")
        if kind == "start":
            current[index] = pair
            reporter.progress(f"  mmr {label}: {where}, pid {payload}")
        elif kind == "metrics":
            curves[pair].append(payload)
            metrics = StepMetrics(**payload)
            reporter.progress(f"  mmr {label} step {metrics.step}: loss {metrics.loss:.4f} "
                              f"lr {metrics.lr:.2e} {metrics.tokens_per_second:,.0f} tok/s ({where})")
        elif kind == "done":
            current.pop(index, None)
            with reporter.trial(label.replace(" ", "-")) as trial:  # the curve, into the trial's own run
                for record in curves.pop(pair):
                    trial.log_metrics(train_metrics(StepMetrics(**record)), step=record["step"])
            trials[pair] = payload
            _record(work_dir, trials)
            reporter.log_metrics({"mmr/loss" if pair[1] == "mamba" else f"mmr/loss_{pair[1]}": payload}, step=pair[0])
            reporter.progress(f"  mmr {label}: distillation loss {payload:.4f} ({where})")

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
                on = f"during {trial_label(*current[index])}" if index in current else "before taking a layer"
                raise StageError(f"mmr worker {index} ({_device_name(hardware, index)}) "
                                 f"{_how_it_ended(worker.exitcode)} {on}")
            if not any(worker.is_alive() for worker in workers):
                missing = [trial_label(*pair) for pair in todo if pair not in trials]
                raise StageError(f"mmr workers all exited with {', '.join(missing)} unscored")
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=30)


__all__ = ["MMR_FILE", "TRIALS_FILE", "choose_conversions", "mmr_candidates", "mmr_table", "parse_trial_key",
           "rank_candidates", "rank_pairs", "run_mmr", "score_layer", "trial_key", "trial_label"]
