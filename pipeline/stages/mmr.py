"""MIL-Mamba-Replacement scoring: how easily each remaining attention layer becomes Mamba (or Gated DeltaNet).

For each attention layer of the parent hybrid, and each mixer of `schedule.mixers` (default: Mamba alone):
initialise that layer alone as that mixer from its attention (swapped into the parent in place: one mixer,
not a copy of the model; `pipeline.convert.mamba_trial` / `gdn_trial`), train only its new mixer for
`mmr.train.steps` steps of distillation from the teacher, and record the mean distillation loss of the last
`mmr.train.loss_window` steps. Low score = easy to replace.

Initialisations (`mmr.seeds`): each Mamba pair is trained `mmr.seeds` times from independent
initialisations of the new mixer's random parameters (draws 0, 1, ... of `mixer_generator`; draw 0 is the
one a conversion of that layer starts from), on the same batches; its score is the mean of those losses,
and mmr.json lists each draw's loss and their standard deviation beside it. A Gated DeltaNet pair is
trained once whatever `mmr.seeds` says: its initialisation from attention draws nothing (`gdn_trial`), so
further draws would repeat the same trial bit for bit; its entry has one loss and std None.

Each finished trial (a layer, mixer and draw) is recorded in `work_dir` (trials.json:
{trial_key(layer, mixer): {draw: loss}}, replaced atomically), so a killed MMR stage resumes at the missing
trials. Writes mmr.json (the (layer, mixer) pairs from easiest to hardest; `choose_conversions` turns them
into a step's layers and their mixers) and mmr.png (the means, the spread of several draws as error bars;
one bar a pair, grouped by layer, when more mixers than Mamba are listed). With the default mixers both
files are the Mamba-only ones: no "mixer" fields, trials.json keyed by the layer alone.

Fan-out (hardware.nproc = N > 1): the trials are independent, so N worker processes run them at once
(`pipeline.stages.workers`): started by the first MMR stage of the run and kept for the later ones, so
only the first stage pays for starting processes, importing torch and initialising a device. For each
stage every worker it uses loads teacher and parent once on its own device (CUDA: worker i on GPU i modulo
the GPUs there are; CPU: N processes, which is what the tests use), takes trials (a layer, mixer and draw)
from the stage's queue (longest first by their cost, steps x batch; equal costs, which every trial of a stage
has, keep the order of `pending_trials`) and releases both models when the stage's trials are done (their GPU
memory is back before the next step trains). Every trial is the same function with the same seed and
batches as in the sequential path, so a pair's score does not depend on which worker ran it, how many
there are, or what the worker ran before (on CPU equal to the sequential scores within float32 noise, see
tests/stages/test_mmr_fanout.py); hardware.nproc stays KEY_NEUTRAL. The stage's process only gathers: it
records each loss as it arrives, forwards the workers' progress lines, logs each trial's curve into that
trial's reporter when the trial has finished (MLflow: its nested run), and notes each worker's start-up
(from the stage's start to its models loaded) in stage.json (`workers`) and as `mmr/worker_startup_s`. A
worker that raises or dies fails the stage in one line naming the worker, its device and the trial it was
on; the workers are then stopped, and the next stage starts new ones.
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
from pipeline.data.stage_data import StageData, distillation_source
from pipeline.errors import StageError
from pipeline.evaluate.plots import bar_plot, grouped_bar_plot
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    Runtime,
    load_model,
    load_tokenizer,
    metrics_callback,
    stage,
    train_metrics,
    write_meta,
)
from pipeline.train import TrainConfig, train

MMR_FILE = "mmr.json"
TRIALS_FILE = "trials.json"  # in work_dir: {trial_key(layer, mixer): {draw: loss}} of the finished trials

# Mixers whose initialisation from attention draws nothing random: one trial a pair, whatever mmr.seeds says.
DETERMINISTIC_MIXERS = frozenset({"gdn"})

Pair = tuple[int, str]  # (attention layer, mixer)
Trial = tuple[int, str, int]  # (attention layer, mixer, draw)


def candidate_score(losses: list[float] | float) -> dict:
    """A candidate's entry from its trials' losses (one per draw; a float is one draw): the mean (`loss`,
    what ranks it), the sample standard deviation of the draws (`std`; None for a single draw) and the
    losses themselves."""
    losses = [float(losses)] if isinstance(losses, (int, float)) else [float(loss) for loss in losses]
    mean = sum(losses) / len(losses)
    std = (sum((loss - mean) ** 2 for loss in losses) / (len(losses) - 1)) ** 0.5 if len(losses) > 1 else None
    return {"loss": mean, "std": std, "losses": losses}


def rank_candidates(trials: dict[int, list[float] | float]) -> list[dict]:
    """Mamba candidates sorted from easiest (lowest mean loss) to hardest, ties by layer index; each entry is
    {"layer", "loss" (the mean), "std", "losses"} (`candidate_score`): the Mamba-only table's ranking."""
    scored = {layer: candidate_score(losses) for layer, losses in trials.items()}
    return [{"layer": layer, **entry} for layer, entry in sorted(scored.items(), key=lambda kv: (kv[1]["loss"], kv[0]))]


def rank_pairs(trials: dict[Pair, list[float] | float], mixers: list[str]) -> list[dict]:
    """(layer, mixer) pairs from easiest (lowest mean loss) to hardest; ties by layer, then the order of
    `mixers`; each entry is {"layer", "mixer", "loss" (the mean), "std", "losses"}."""
    order = {mixer: index for index, mixer in enumerate(mixers)}
    scored = {pair: candidate_score(losses) for pair, losses in trials.items()}
    ranked = sorted(scored.items(), key=lambda kv: (kv[1]["loss"], kv[0][0], order.get(kv[0][1], len(order))))
    return [{"layer": layer, "mixer": mixer, **entry} for (layer, mixer), entry in ranked]


def mmr_candidates(layers: list[int], mixers: list[str]) -> list[Pair]:
    """Every (attention layer, mixer) pair a stage scores, layer by layer in the order of `mixers`."""
    return [(layer, mixer) for layer in layers for mixer in mixers]


def draws_of(mixer: str, seeds: int) -> int:
    """How many initialisations a pair of `mixer` is trained from: `seeds` (mmr.seeds), or one for a mixer
    whose initialisation draws nothing (DETERMINISTIC_MIXERS)."""
    return 1 if mixer in DETERMINISTIC_MIXERS else seeds


def trial_key(layer: int, mixer: str) -> str:
    """A pair's key in trials.json: the layer alone for Mamba (as with Mamba only), "layer:mixer" else."""
    return str(layer) if mixer == "mamba" else f"{layer}:{mixer}"


def parse_trial_key(key: str) -> Pair:
    layer, _, mixer = str(key).partition(":")
    return int(layer), mixer or "mamba"


def trial_name(layer: int, mixer: str = "mamba", draw: int = 0) -> str:
    """A trial's name (its reporter; MLflow: its nested run): `layer-<i>` for draw 0 of Mamba, as with Mamba
    alone and one draw; `-<mixer>` and `-init-<draw>` added otherwise."""
    return trial_label(layer, mixer, draw).replace(" initialisation ", "-init-").replace(" ", "-")


def trial_label(layer: int, mixer: str = "mamba", draw: int = 0) -> str:
    """How progress lines name a trial ("layer 3", "layer 3 gdn", "layer 3 initialisation 1")."""
    return (f"layer {layer}" + ("" if mixer == "mamba" else f" {mixer}")
            + (f" initialisation {draw}" if draw else ""))


def pending_trials(pairs: list[Pair], seeds: int, trials: dict[Pair, dict[int, float]]) -> list[Trial]:
    """The (layer, mixer, draw) trials still to run, pair by pair: draws 0..draws_of(mixer, seeds)-1 of every
    pair, less those recorded in `trials`."""
    return [(layer, mixer, draw) for layer, mixer in pairs for draw in range(draws_of(mixer, seeds))
            if draw not in trials.get((layer, mixer), {})]


def draw_losses(trials: dict[Pair, dict[int, float]], pair: Pair, seeds: int) -> list[float] | None:
    """A pair's losses in draw order, once all its draws are recorded (else None)."""
    recorded, count = trials.get(pair, {}), draws_of(pair[1], seeds)
    return [recorded[draw] for draw in range(count)] if all(draw in recorded for draw in range(count)) else None


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
                precision: str, seed: int, layer: int, callback, *, mixer: str = "mamba",
                gdn: GDNConfig | None = None, draw: int = 0) -> float:
    """One MMR trial: the parent with `layer` swapped for a new mixer initialised from its attention (no copy
    of the model), only that mixer trained; returns the trial's final distillation loss. Mamba: MIL with
    initialisation `draw` of `mixer_generator(seed, layer, draw)`. Gated DeltaNet (`gdn`'s settings): its
    initialisation draws nothing, so `seed` and `draw` do not change it (the stage runs draw 0 alone).
    Every trial of every pair trains on the same batches (`train_cfg.seed`)."""
    prefix = f"model.layers.{layer}.mixer."
    if mixer == "gdn":
        trial = gdn_trial(parent_model, layer, gdn_options=None if gdn is None else {"conv_kernel": gdn.d_conv})
    else:
        trial = mamba_trial(parent_model, layer, seed=seed, draw=draw)
    with trial as student:
        result = train(
            student, stage_data.batch_source(distillation_source(data), train_cfg.batch_size, train_cfg.seed),
            train_cfg,
            teacher=teacher_model, callback=callback,
            trainable_filter=lambda name, _param: name.startswith(prefix), precision=precision,
        )
    return result.final_distill_loss


def _read_trials(path: Path) -> dict[Pair, dict[int, float]]:
    if not path.exists():
        return {}
    return {parse_trial_key(key): {int(draw): float(loss) for draw, loss in draws.items()}
            for key, draws in json.loads(path.read_text()).items()}


def _record(work_dir: Path, trials: dict[Pair, dict[int, float]]) -> None:
    """trials.json replaced atomically: a kill leaves the previous record or this one, never half of one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    temporary = work_dir / f".{TRIALS_FILE}.tmp"
    temporary.write_text(json.dumps({trial_key(*pair): draws for pair, draws in trials.items()}))
    os.replace(temporary, work_dir / TRIALS_FILE)


def _report_recorded(reporter: Reporter, pairs: list[Pair], seeds: int, trials: dict[Pair, dict[int, float]]) -> None:
    for pair in pairs:
        losses, label = draw_losses(trials, pair, seeds), trial_label(*pair)
        if losses is not None:
            reporter.progress(f"  mmr {label}: {candidate_score(losses)['loss']:.4f} (recorded)")
        elif trials.get(pair):
            count = draws_of(pair[1], seeds)
            done = sum(draw in trials[pair] for draw in range(count))
            reporter.progress(f"  mmr {label}: {done} of {count} initialisations recorded")


def _finish_trial(work_dir: Path, reporter: Reporter, trials: dict[Pair, dict[int, float]], seeds: int,
                  task: Trial, loss: float, where: str = "") -> None:
    """Record one finished trial and report it; a pair whose last missing draw this is gets its score logged
    as `mmr/loss` (and `mmr/loss_std` with several draws) at step = its layer, `mmr/loss_<mixer>` (and
    `mmr/loss_std_<mixer>`) for mixers other than Mamba."""
    layer, mixer, draw = task
    trials.setdefault((layer, mixer), {})[draw] = loss
    _record(work_dir, trials)
    reporter.progress(f"  mmr {trial_label(layer, mixer, draw)}: distillation loss {loss:.4f}{where}")
    losses = draw_losses(trials, (layer, mixer), seeds)
    if losses is not None:
        score, suffix, count = candidate_score(losses), "" if mixer == "mamba" else f"_{mixer}", len(losses)
        reporter.log_metrics({f"mmr/loss{suffix}": score["loss"],
                              **({f"mmr/loss_std{suffix}": score["std"]} if count > 1 else {})}, step=layer)
        if count > 1:
            reporter.progress(f"  mmr {trial_label(layer, mixer)}: mean distillation loss {score['loss']:.4f} "
                              f"+- {score['std']:.4f} over {count} initialisations")


def _candidates(parent: str | Path) -> tuple[list[int], int, int]:
    """(attention layers, number of Mamba layers, number of Gated DeltaNet layers) of the parent checkpoint,
    read from its config files alone (the fan-out's stage process loads no model)."""
    from pipeline.model.checkpoint import layer_kinds_of
    from pipeline.model.layouts import LayoutError
    from pipeline.stages.common import require_folder

    folder = require_folder(parent, "parent checkpoint")
    try:
        kinds = layer_kinds_of(folder)
    except (LayoutError, ValueError) as exc:
        raise StageError(f"parent checkpoint at {folder}: {exc}") from None
    return kinds["attention"], len(kinds["mamba"]), len(kinds["gdn"])


def mmr_table(trials: dict[Pair, dict[int, float]], layers: list[int], mixers: list[str], seeds: int,
              n_mamba: int, n_gdn: int, train_cfg: TrainConfig) -> dict:
    """mmr.json from the complete trials: with the default mixers exactly the Mamba-only table
    {"n_mamba", "steps", "score_window", "seeds", "ranking": [{"layer", "loss", "std", "losses"}]} ("n_gdn"
    added only for a parent with Gated DeltaNet layers); else each entry names its mixer too and the table
    lists its mixers and Gated DeltaNet count. "seeds" is mmr.seeds: the draws of each Mamba pair (a Gated
    DeltaNet pair has one)."""
    default = list(mixers) == DEFAULT_MIXERS
    losses = {pair: draw_losses(trials, pair, seeds) for pair in mmr_candidates(layers, mixers)}
    if default:
        ranking = rank_candidates({layer: pair_losses for (layer, _mixer), pair_losses in losses.items()})
    else:
        ranking = rank_pairs(losses, mixers)
    result = {"n_mamba": n_mamba, "steps": train_cfg.steps, "score_window": train_cfg.loss_window, "seeds": seeds,
              "ranking": ranking}
    if not default:
        result["mixers"] = list(mixers)
    if n_gdn or not default:
        result["n_gdn"] = n_gdn
    return result


def _plot(ranking: list[dict], layers: list[int], mixers: list[str], seeds: int, title: str, path: Path) -> None:
    """Mean loss bars, one a layer (Mamba only, as mmr.png always was) or one a pair grouped by layer; with
    several draws, +- 1 std error bars (Mamba only: and each draw a dot)."""
    scores = {(entry["layer"], entry.get("mixer", "mamba")): entry for entry in ranking}
    labels = [str(layer) for layer in layers]
    if list(mixers) == DEFAULT_MIXERS:
        entries = [scores[(layer, "mamba")] for layer in layers]
        spread = f"\nmean of {seeds} initialisations (dots) +- 1 std" if seeds > 1 else ""
        bar_plot([entry["loss"] for entry in entries], labels,
                 errors=[entry["std"] or 0.0 for entry in entries] if seeds > 1 else None,
                 points=[entry["losses"] for entry in entries] if seeds > 1 else None,
                 title=title + spread, ylabel="mean distillation loss", path=path)
        return
    spread = ""
    if seeds > 1:
        single = [mixer for mixer in mixers if draws_of(mixer, seeds) == 1]
        spread = f"\nmean +- 1 std of {seeds} draws" + (f" ({', '.join(single)}: 1)" if single else "")
    grouped_bar_plot({mixer: [scores[(layer, mixer)]["loss"] for layer in layers] for mixer in mixers}, labels,
                     errors={mixer: [scores[(layer, mixer)]["std"] for layer in layers] for mixer in mixers}
                     if seeds > 1 else None,
                     title=title + spread, ylabel="mean distillation loss", path=path)


@stage("mmr", version=5)
def run_mmr(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, mixers: list[str] | None = None,
            gdn: GDNConfig | None = None, *, teacher: str | Path, parent: str | Path, out_dir: str | Path,
            work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """Score every (attention layer, mixer) pair of `parent` (see the module's docstring). `mixers`
    (schedule.mixers) and `gdn` are given only by a run whose mixers are not the default [mamba], so
    Mamba-only runs keep their keys (and write the Mamba-only files)."""
    reporter = reporter or ConsoleReporter()
    mixers = list(mixers or DEFAULT_MIXERS)
    started, out_dir, work_dir = time.time(), Path(out_dir), Path(work_dir)
    trials = _read_trials(work_dir / TRIALS_FILE)
    train_cfg, seeds = mmr.train, mmr.seeds
    if hardware.nproc > 1:
        layers, n_mamba, n_gdn = _candidates(parent)
        pairs = mmr_candidates(layers, mixers)
        _report_recorded(reporter, pairs, seeds, trials)
        workers = _fan_out(mmr, data, hardware, seed, teacher=teacher, parent=parent, work_dir=work_dir,
                           reporter=reporter, todo=pending_trials(pairs, seeds, trials), trials=trials, gdn=gdn)
    else:
        workers = {}
        runtime = Runtime.resolve(hardware)
        teacher_model = load_model(teacher, runtime, "teacher")  # frozen: bf16 under bf16-mixed
        parent_model = load_model(parent, runtime, "parent checkpoint", fp32=True)  # fp32: its trial mixers train
        stage_data = StageData(data, load_tokenizer(teacher))
        config = parent_model.config
        layers, n_mamba, n_gdn = config.attention_layers, len(config.mamba_layers), len(config.gdn_layers)
        pairs = mmr_candidates(layers, mixers)
        precision = runtime.precision
        _report_recorded(reporter, pairs, seeds, trials)
        for task in pending_trials(pairs, seeds, trials):
            layer, mixer, draw = task
            with reporter.trial(trial_name(*task)) as trial:
                loss = score_layer(parent_model, teacher_model, stage_data, data, train_cfg, precision, seed, layer,
                                   metrics_callback(trial, f"mmr {trial_label(*task)}"), mixer=mixer, gdn=gdn,
                                   draw=draw)
            _finish_trial(work_dir, reporter, trials, seeds, task, loss)
    result = mmr_table(trials, layers, mixers, seeds, n_mamba, n_gdn, train_cfg)
    ranking = result["ranking"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MMR_FILE).write_text(json.dumps(result, indent=2) + "\n")
    _plot(ranking, layers, mixers, seeds, f"MMR from H-{n_mamba + n_gdn}: loss after {train_cfg.steps} steps",
          out_dir / "mmr.png")
    for name in (MMR_FILE, "mmr.png"):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "mmr", parent=f"H-{n_mamba + n_gdn}", started=started, ranking=ranking,
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
    runtime: Runtime  # resolved once by the stage's process
    seed: int
    teacher: str
    parent: str
    gdn: GDNConfig | None = None  # the settings of Gated DeltaNet trials

    def load(self, index: int) -> _Loaded:
        """Teacher and parent once a stage, on this worker's device (the tokenised data the worker's
        process already holds from an earlier stage is reused: `StageData`'s process-wide cache)."""
        return _Loaded(teacher=load_model(self.teacher, self.runtime, "teacher"),
                       parent=load_model(self.parent, self.runtime, "parent checkpoint", fp32=True),
                       data=StageData(self.data, load_tokenizer(self.teacher)), precision=self.runtime.precision)

    def run(self, loaded: _Loaded, task: Trial, report) -> float:
        layer, mixer, draw = task
        return score_layer(loaded.parent, loaded.teacher, loaded.data, self.data, self.mmr.train, loaded.precision,
                           self.seed, layer, lambda metrics: report("metrics", dataclasses.asdict(metrics)),
                           mixer=mixer, gdn=self.gdn, draw=draw)

    def release(self, loaded: _Loaded) -> None:
        """The models go, and their device memory with them (the next stage trains on these GPUs)."""
        import gc

        import torch

        loaded.teacher = loaded.parent = None
        gc.collect()
        if self.runtime.device == "cuda":
            torch.cuda.empty_cache()

    def cost(self, task) -> int:
        """What a trial costs, in sequences trained on (steps x batch): the same for every trial of a stage,
        so the queue keeps the candidates' order."""
        return self.mmr.train.steps * self.mmr.train.batch_size * self.mmr.train.grad_accum


def _worker_devices(runtime: Runtime) -> tuple[str, ...]:
    """Each worker's device (the runtime resolved once by the stage's process, so every worker and the
    error lines agree): on CUDA, worker i on GPU i modulo the GPUs there are (more workers than GPUs share
    them), on CPU all on "cpu"."""
    import torch

    if runtime.device != "cuda":
        return ("cpu",) * runtime.nproc
    count = torch.cuda.device_count()
    return tuple(f"cuda:{index % count}" for index in range(runtime.nproc))


def _fan_out(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher, parent,
             work_dir: Path, reporter: Reporter, todo: list[Trial], trials: dict[Pair, dict[int, float]],
             gdn: GDNConfig | None = None) -> dict:
    """Run the (layer, mixer, draw) trials of `todo` on the run's hardware.nproc worker processes (started by
    the first stage that needs them, reused by the later ones); `trials` is filled in (and recorded in
    work_dir) as the losses arrive. Returns the workers' start-up record (for stage.json), {} when nothing
    was left to run."""
    from pipeline.stages.workers import WorkerFailure, pool_for
    from pipeline.train.loop import StepMetrics

    if not todo:
        return {}
    runtime = Runtime.resolve(hardware)
    devices = _worker_devices(runtime)
    count = min(runtime.nproc, len(todo))
    threads = runtime.threads or max(1, (os.cpu_count() or 1) // runtime.nproc)
    job = _WorkerJob(mmr, data, runtime, seed, str(teacher), str(parent), gdn)
    pool = pool_for(runtime.nproc, _WorkerSetup(devices, threads if runtime.device != "cuda" else None))
    reused = pool.stages_run > 0
    shared = " (sharing GPUs)" if runtime.device == "cuda" and len(set(devices[:count])) < count else ""
    reporter.progress(f"  mmr: {len(todo)} trials on {count} worker processes ({', '.join(devices[:count])}){shared}, "
                      f"{'reused from an earlier stage' if reused else 'started now'}")
    curves: dict[Trial, list[dict]] = {task: [] for task in todo}

    def where(index: int) -> str:
        return f"mmr worker {index} ({devices[index]})"

    def handle(kind: str, index: int, task, payload) -> None:
        if kind == "ready":
            reporter.progress(f"  mmr: {where(index)} loaded teacher and parent in {payload:.1f} s")
            return
        task = tuple(task)  # (layer, mixer, draw)
        label = trial_label(*task)
        if kind == "start":
            reporter.progress(f"  mmr {label}: {where(index)}, pid {payload}")
        elif kind == "metrics":
            curves[task].append(payload)
            metrics = StepMetrics(**payload)
            reporter.progress(f"  mmr {label} step {metrics.step}: loss {metrics.loss:.4f} "
                              f"lr {metrics.lr:.2e} {metrics.tokens_per_second:,.0f} tok/s ({where(index)})")
        elif kind == "done":
            with reporter.trial(trial_name(*task)) as trial:  # the curve, into the trial's own run
                for record in curves.pop(task):
                    trial.log_metrics(train_metrics(StepMetrics(**record)), step=record["step"])
            _finish_trial(work_dir, reporter, trials, mmr.seeds, task, payload, where=f" ({where(index)})")

    try:
        timing = pool.run_stage(job, todo, handle, cost=job.cost, workers=count)
    except WorkerFailure as failure:
        label = trial_label(*failure.task) if failure.task is not None else None
        if failure.message is not None:
            on = f"on {label}" if label is not None else "while loading the teacher and parent"
            raise StageError(f"{where(failure.index)} failed {on}: {failure.message}") from None
        on = f"during {label}" if label is not None else "before taking a trial"
        raise StageError(f"{where(failure.index)} {failure.how()} {on}") from None
    startup = {str(index): round(seconds, 3) for index, seconds in sorted(timing.ready_s.items())}
    reporter.progress(f"  mmr: worker start-up {', '.join(f'{timing.ready_s[i]:.1f} s' for i in sorted(timing.ready_s))} "
                      f"({'reused workers' if reused else 'started for this stage'})")
    reporter.log_metrics({"mmr/worker_startup_s": max(timing.ready_s.values())})
    return {"worker_startup_s": startup, "workers_reused": reused}


__all__ = ["DETERMINISTIC_MIXERS", "MMR_FILE", "TRIALS_FILE", "candidate_score", "choose_conversions", "draw_losses",
           "draws_of", "mmr_candidates", "mmr_table", "parse_trial_key", "pending_trials", "rank_candidates",
           "rank_pairs", "run_mmr", "score_layer", "trial_key", "trial_label", "trial_name"]
