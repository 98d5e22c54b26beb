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

Fan-out (hardware.nproc = N > 1): the trials are independent, so N worker processes run them at once
(`pipeline.stages.workers`): started by the first MMR stage of the run and kept for the later ones, so
only the first stage pays for starting processes, importing torch and initialising a device. For each
stage every worker it uses loads teacher and parent once on its own device (CUDA: worker i on GPU i modulo
the GPUs there are; CPU: N processes, which is what the tests use), takes trials from the stage's queue
(longest first by their cost, steps x batch; equal costs, as today's trials all are, keep the candidates'
order) and releases both models when the stage's trials are done (their GPU memory is back before the next
step trains). Every trial is the same function with the same seed and batches as in the sequential path, so
a trial's score does not depend on which worker ran it, how many there are, or what the worker ran before
(on CPU equal to the sequential scores within float32 noise, see tests/stages/test_mmr_fanout.py);
hardware.nproc stays KEY_NEUTRAL. The stage's process only gathers: it records each score as it arrives,
forwards the workers' progress lines, logs each trial's curve into that trial's reporter when the trial has
finished (MLflow: its nested run), and notes each worker's start-up (from the stage's start to its models
loaded) in stage.json (`workers`) and as `mmr/worker_startup_s`. A worker that raises or dies fails the
stage in one line naming the worker, its device and the trial it was on; the workers are then stopped, and
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


@stage("mmr", version=5)
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
        workers = _fan_out(mmr, data, hardware, seed, teacher=teacher, parent=parent, work_dir=work_dir,
                           reporter=reporter, candidates=mmr_candidates(layers, mixers), trials=trials, gdn=gdn)
    else:
        workers = {}
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
    write_meta(out_dir, "mmr", settings, parent=f"H-{n_mamba + n_gdn}", started=started, ranking=ranking,
               **({"workers": workers} if workers else {}))
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
    gdn: GDNConfig | None = None  # the settings of Gated DeltaNet trials

    def load(self, index: int) -> _Loaded:
        """Teacher and parent once a stage, on this worker's device (the tokenised data the worker's
        process already holds from an earlier stage is reused: `StageData`'s process-wide cache)."""
        return _Loaded(teacher=load_model(self.teacher, self.hardware, "teacher"),
                       parent=load_model(self.parent, self.hardware, "parent checkpoint", fp32=True),
                       data=StageData(self.data, load_tokenizer(self.teacher)),
                       precision=resolve_precision(self.hardware))

    def run(self, loaded: _Loaded, task: tuple[int, str], report) -> float:
        layer, mixer = task
        return score_layer(loaded.parent, loaded.teacher, loaded.data, self.data, self.mmr.train, loaded.precision,
                           self.seed, layer, lambda metrics: report("metrics", dataclasses.asdict(metrics)),
                           mixer=mixer, gdn=self.gdn)

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
             work_dir: Path, reporter: Reporter, candidates: list[tuple[int, str]],
             trials: dict[tuple[int, str], float], gdn: GDNConfig | None = None) -> dict:
    """Score the (layer, mixer) candidates not in `trials` on the run's hardware.nproc worker processes
    (started by the first stage that needs them, reused by the later ones); `trials` is filled in (and
    recorded in work_dir) as the scores arrive. Returns the workers' start-up record (for stage.json), {}
    when nothing was left to score."""
    from pipeline.stages.workers import WorkerFailure, pool_for
    from pipeline.train.loop import StepMetrics

    for pair in candidates:
        if pair in trials:
            reporter.progress(f"  mmr {trial_label(*pair)}: {trials[pair]:.4f} (recorded)")
    todo = [pair for pair in candidates if pair not in trials]
    if not todo:
        return {}
    hardware, devices = _resolved_hardware(hardware)
    count = min(hardware.nproc, len(todo))
    threads = hardware.threads or max(1, (os.cpu_count() or 1) // hardware.nproc)
    job = _WorkerJob(mmr, data, hardware, seed, str(teacher), str(parent), gdn)
    pool = pool_for(hardware.nproc, _WorkerSetup(devices, threads if hardware.device != "cuda" else None))
    reused = pool.stages_run > 0
    shared = " (sharing GPUs)" if hardware.device == "cuda" and len(set(devices[:count])) < count else ""
    reporter.progress(f"  mmr: {len(todo)} trials on {count} worker processes ({', '.join(devices[:count])}){shared}, "
                      f"{'reused from an earlier stage' if reused else 'started now'}")
    curves: dict[tuple[int, str], list[dict]] = {pair: [] for pair in todo}

    def where(index: int) -> str:
        return f"mmr worker {index} ({devices[index]})"

    def handle(kind: str, index: int, pair, payload) -> None:
        if kind == "ready":
            reporter.progress(f"  mmr: {where(index)} loaded teacher and parent in {payload:.1f} s")
            return
        pair = tuple(pair)  # (layer, mixer)
        label = trial_label(*pair)
        if kind == "start":
            reporter.progress(f"  mmr {label}: {where(index)}, pid {payload}")
        elif kind == "metrics":
            curves[pair].append(payload)
            metrics = StepMetrics(**payload)
            reporter.progress(f"  mmr {label} step {metrics.step}: loss {metrics.loss:.4f} "
                              f"lr {metrics.lr:.2e} {metrics.tokens_per_second:,.0f} tok/s ({where(index)})")
        elif kind == "done":
            with reporter.trial(label.replace(" ", "-")) as trial:  # the curve, into the trial's own run
                for record in curves.pop(pair):
                    trial.log_metrics(train_metrics(StepMetrics(**record)), step=record["step"])
            trials[pair] = payload
            _record(work_dir, trials)
            reporter.log_metrics({"mmr/loss" if pair[1] == "mamba" else f"mmr/loss_{pair[1]}": payload}, step=pair[0])
            reporter.progress(f"  mmr {label}: distillation loss {payload:.4f} ({where(index)})")

    try:
        timing = pool.run_stage(job, todo, handle, cost=job.cost, workers=count)
    except WorkerFailure as failure:
        label = trial_label(*failure.task) if failure.task is not None else None
        if failure.message is not None:
            on = f"on {label}" if label is not None else "while loading the teacher and parent"
            raise StageError(f"{where(failure.index)} failed {on}: {failure.message}") from None
        on = f"during {label}" if label is not None else "before taking a layer"
        raise StageError(f"{where(failure.index)} {failure.how()} {on}") from None
    startup = {str(index): round(seconds, 3) for index, seconds in sorted(timing.ready_s.items())}
    reporter.progress(f"  mmr: worker start-up {', '.join(f'{timing.ready_s[i]:.1f} s' for i in sorted(timing.ready_s))} "
                      f"({'reused workers' if reused else 'started for this stage'})")
    reporter.log_metrics({"mmr/worker_startup_s": max(timing.ready_s.values())})
    return {"worker_startup_s": startup, "workers_reused": reused}


__all__ = ["MMR_FILE", "TRIALS_FILE", "choose_conversions", "mmr_candidates", "mmr_table", "parse_trial_key",
           "rank_candidates", "rank_pairs", "run_mmr", "score_layer", "trial_key", "trial_label"]
