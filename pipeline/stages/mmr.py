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

Fan-out (hardware.nproc = N > 1): the trials are independent, so N worker processes run them at once, each
loading teacher and parent once on its own device (CUDA: one GPU a worker, `cuda:<i>`; CPU: N processes,
which is what the tests use) and taking trials (a layer, mixer and draw) from a shared queue. Every trial is
the same function with the same seed and batches as in the sequential path, so a pair's score does not
depend on which worker ran it or how many there are (on CPU equal to the sequential scores within float32
noise, see tests/stages/test_mmr_fanout.py); hardware.nproc stays KEY_NEUTRAL. The stage's process only
gathers: it records each loss as it arrives, forwards the workers' progress lines, and logs each trial's
curve into that trial's reporter when the trial has finished (MLflow: its nested run). A worker that raises
or dies fails the stage in one line naming the worker, its device and the trial it was on.
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
            student, stage_data.batch_source(distill_kind(data), train_cfg.batch_size, train_cfg.seed), train_cfg,
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
        _fan_out(mmr, data, hardware, seed, teacher=teacher, parent=parent, work_dir=work_dir, reporter=reporter,
                 todo=pending_trials(pairs, seeds, trials), trials=trials, gdn=gdn)
    else:
        teacher_model = load_model(teacher, hardware, "teacher")  # frozen: bf16 under bf16-mixed
        parent_model = load_model(parent, hardware, "parent checkpoint", fp32=True)  # fp32: its trial mixers train
        stage_data = StageData(data, load_tokenizer(teacher))
        config = parent_model.config
        layers, n_mamba, n_gdn = config.attention_layers, len(config.mamba_layers), len(config.gdn_layers)
        pairs = mmr_candidates(layers, mixers)
        precision = resolve_precision(hardware)
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
    """One worker process: load teacher and parent once on its device, then run (layer, mixer, draw) trials
    from `tasks` until a None; every message to `results` is (kind, worker index, trial, payload)."""
    task = None
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
            results.put(("metrics", index, task, dataclasses.asdict(metrics)))

        while (task := tasks.get()) is not None:
            layer, mixer, draw = task
            results.put(("start", index, task, os.getpid()))
            loss = score_layer(parent_model, teacher_model, stage_data, job.data, job.mmr.train, precision, job.seed,
                               layer, callback, mixer=mixer, gdn=job.gdn, draw=draw)
            results.put(("done", index, task, loss))
    except BaseException as exc:
        results.put(("error", index, task, f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"))
        raise SystemExit(1) from None


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _fan_out(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher, parent,
             work_dir: Path, reporter: Reporter, todo: list[Trial], trials: dict[Pair, dict[int, float]],
             gdn: GDNConfig | None = None) -> None:
    """Run the (layer, mixer, draw) trials of `todo` on hardware.nproc worker processes; `trials` is filled in
    (and recorded in work_dir) as the losses arrive."""
    import multiprocessing

    from pipeline.train.loop import StepMetrics

    if not todo:
        return
    hardware = _resolved_hardware(hardware)
    count = min(hardware.nproc, len(todo))
    threads = hardware.threads or max(1, (os.cpu_count() or 1) // count)
    job = _WorkerJob(mmr, data, hardware, seed, str(teacher), str(parent), threads, gdn)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; the same on CPU
    tasks, results = context.Queue(), context.Queue()
    for task in todo:
        tasks.put(task)
    for _ in range(count):
        tasks.put(None)
    workers = [context.Process(target=_worker, args=(job, index, tasks, results), name=f"mmr-worker-{index}",
                               daemon=True) for index in range(count)]
    reporter.progress(f"  mmr: {len(todo)} trials on {count} worker processes "
                      f"({', '.join(_device_name(hardware, i) for i in range(count))})")
    for worker in workers:
        worker.start()
    current: dict[int, Trial] = {}  # worker -> the trial it is on
    curves: dict[Trial, list[dict]] = {task: [] for task in todo}
    finished: set[Trial] = set()

    def handle(message) -> None:
        kind, index, task, payload = message
        task = tuple(task) if task is not None else None  # (layer, mixer, draw)
        where = f"mmr worker {index} ({_device_name(hardware, index)})"
        if kind == "error":
            on = f"on {trial_label(*task)}" if task is not None else "while loading the teacher and parent"
            raise StageError(f"{where} failed {on}: {payload}")
        if kind == "start":
            current[index] = task
            reporter.progress(f"  mmr {trial_label(*task)}: {where}, pid {payload}")
        elif kind == "metrics":
            curves[task].append(payload)
            metrics = StepMetrics(**payload)
            reporter.progress(f"  mmr {trial_label(*task)} step {metrics.step}: loss {metrics.loss:.4f} "
                              f"lr {metrics.lr:.2e} {metrics.tokens_per_second:,.0f} tok/s ({where})")
        elif kind == "done":
            current.pop(index, None)
            with reporter.trial(trial_name(*task)) as trial:  # the curve, into the trial's own run
                for record in curves.pop(task):
                    trial.log_metrics(train_metrics(StepMetrics(**record)), step=record["step"])
            finished.add(task)
            _finish_trial(work_dir, reporter, trials, mmr.seeds, task, payload, where=f" ({where})")

    try:
        while len(finished) < len(todo):
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
                on = f"during {trial_label(*current[index])}" if index in current else "before taking a trial"
                raise StageError(f"mmr worker {index} ({_device_name(hardware, index)}) "
                                 f"{_how_it_ended(worker.exitcode)} {on}")
            if not any(worker.is_alive() for worker in workers):
                missing = [trial_label(*task) for task in todo if task not in finished]
                raise StageError(f"mmr workers all exited with trials unfinished: {', '.join(missing)}")
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=30)


__all__ = ["DETERMINISTIC_MIXERS", "MMR_FILE", "TRIALS_FILE", "candidate_score", "choose_conversions", "draw_losses",
           "draws_of", "mmr_candidates", "mmr_table", "parse_trial_key", "pending_trials", "rank_candidates",
           "rank_pairs", "run_mmr", "score_layer", "trial_key", "trial_label", "trial_name"]
