"""KL-guided layer selection (schedule.selection=kl): which remaining attention layers are worth the least
as attention, measured by how much the KL to the teacher falls when each one alone stays attention.

After Li et al., "Distilling to Hybrid Attention Models via KL-Guided Layer Selection" (arXiv 2512.20569;
their selector "GA-S2", github.com/fla-org/hybrid-distillation). The paper: from an all-linear student
(after its stage-1 alignment of the attention outputs), restore exactly one layer to softmax attention,
run a short stage-2 distillation (KL to the teacher's logits) and record its training loss; do so for
every layer, rank the layers by that loss, and keep the K with the lowest (the largest KL fall) as
attention. A layer's score is its marginal utility: how much the distillation objective improves when
that layer alone is attention in an otherwise converted model.

Here, at each progressive step, from the previous checkpoint H-K with remaining attention layers R:
- the reference trial: every layer of R converted (MIL-initialised from the parent, `hybridize` with the
  run's seed: each new mixer's random parameters from its own seeded CPU generator, `mixer_generator`, so
  the same as the step's conversion of that layer draws), trained `mmr.train.steps` steps of distillation
  from the teacher;
- one trial per layer i of R: every layer of R but i converted, i kept as attention, trained the same way
  on the same batches (the same seed, so every trial sees the same data in the same order);
- a trial's loss is its mean distillation loss (the KL, `train.loss` of `mmr.train`) over the last
  `mmr.train.loss_window` steps, the paper's "logged training loss"; the score of i is
  `kl_fall = loss(all of R converted) - loss(i kept)`.
kl.json ranks the layers from the smallest fall (least useful as attention: converted first) to the
largest, ties by layer index; `kl_step` converts the first ones. kl.png shows the fall per layer.

Approximations of the paper at this scale, stated: (1) the students start from MIL initialisation of the
current checkpoint, not from a stage-1 hidden-state alignment (MIL is this project's first stage); (2) the
layers are scored again before every step from the current checkpoint (as MMR is), not once from an
all-linear model, since the schedule converts progressively; (3) each trial trains as an MMR trial does
(`mmr.train`: the same steps, batch, learning rate and loss window, so the two scorings cost the same per
trial, KL one trial more; one initialisation a trial, whatever `mmr.seeds` says), only its new mixers
trainable (`mmr.train.trainable` is "mamba"), where the paper's stage 2 trains every weight for far more
tokens. With a single remaining candidate there is
nothing to compare and no trial runs.

Each finished trial is recorded in `work_dir` (trials.json, replaced atomically), so a killed stage resumes
at the missing trials. The trials run one after the other in one process (no fan-out over GPUs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.config import DataConfig, HardwareConfig
from pipeline.convert import hybridize
from pipeline.data.stage_data import StageData, distillation_source
from pipeline.errors import StageError
from pipeline.evaluate.plots import bar_plot
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    load_model,
    load_tokenizer,
    metrics_callback,
    resolve_precision,
    stage,
    write_meta,
)
from pipeline.stages.convert import convert_and_distil, layer_kinds_of
from pipeline.train import TrainConfig, train

KL_FILE = "kl.json"
KL_PLOT = "kl.png"
TRIALS_FILE = "trials.json"  # in work_dir: {"all": loss, "<layer>": loss} of the finished trials
ALL_CONVERTED = "all"  # the reference trial: every remaining attention layer converted


def rank_by_fall(reference: float, kept: dict[int, float]) -> list[dict]:
    """The layers from the smallest KL fall (converted first) to the largest; ties by layer index."""
    entries = [{"layer": layer, "kl_fall": reference - loss, "loss": loss} for layer, loss in kept.items()]
    return sorted(entries, key=lambda entry: (entry["kl_fall"], entry["layer"]))


def trial_loss(parent_model, teacher_model, stage_data: StageData, data: DataConfig, train_cfg: TrainConfig,
               precision: str, seed: int, converted: list[int], callback) -> float:
    """One trial: `converted` layers of the parent MIL-initialised as Mamba (a copy of the model; the parent
    is left as it is), only their new mixers trained; returns the mean distillation loss of the last
    `train_cfg.loss_window` steps."""
    student = hybridize(parent_model, converted, seed=seed)
    prefixes = tuple(f"model.layers.{layer}.mixer." for layer in converted)
    result = train(
        student, stage_data.batch_source(distillation_source(data), train_cfg.batch_size, train_cfg.seed), train_cfg,
        teacher=teacher_model, callback=callback, precision=precision,
        trainable_filter=(lambda name, _param: name.startswith(prefixes)) if train_cfg.trainable == "mamba" else None,
    )
    del student
    return float(result.final_distill_loss)


def _record(work_dir: Path, trials: dict[str, float]) -> None:
    """trials.json replaced atomically: a kill leaves the previous record or this one, never half of one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    temporary = work_dir / f".{TRIALS_FILE}.tmp"
    temporary.write_text(json.dumps(trials))
    os.replace(temporary, work_dir / TRIALS_FILE)


@stage("kl", version=1)
def run_kl(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher: str | Path,
           parent: str | Path, out_dir: str | Path, work_dir: str | Path, generic: str | Path | None = None,
           reporter: Reporter | None = None) -> dict:
    """Scores every attention layer of `parent` by its KL fall (see the module); writes kl.json and kl.png.
    `train`: the trials' training settings (the chain gives `mmr.train`, the MMR trials' own: a trial trains
    only its new mixers, as `trainable="mamba"` there says); `seed`: the new mixers' initialisation; `generic`:
    the teacher's samples folder (data.generic=teacher, a distillation on generic text or a mix)."""
    reporter = reporter or ConsoleReporter()
    started, out_dir, work_dir = time.time(), Path(out_dir), Path(work_dir)
    train_cfg = train
    kinds = layer_kinds_of(Path(parent))
    layers, n_mamba = kinds["attention"], len(kinds["mamba"]) + len(kinds["gdn"])
    if not layers:
        raise StageError(f"KL-guided selection from H-{n_mamba}: the parent checkpoint has no attention layer left")
    done_path = work_dir / TRIALS_FILE
    trials: dict[str, float] = json.loads(done_path.read_text()) if done_path.exists() else {}
    if len(layers) > 1:
        teacher_model = load_model(teacher, hardware, "teacher")  # frozen: bf16 under bf16-mixed
        parent_model = load_model(parent, hardware, "parent checkpoint", fp32=True)  # fp32: the trials' masters
        stage_data = StageData(data, load_tokenizer(teacher)).with_generic(generic)
        precision = resolve_precision(hardware)
        plan = [(ALL_CONVERTED, list(layers))] + [(str(layer), [other for other in layers if other != layer])
                                                  for layer in layers]
        for key, converted in plan:
            label = "all converted" if key == ALL_CONVERTED else f"layer {key} kept"
            if key in trials:
                reporter.progress(f"  kl {label}: {trials[key]:.4f} (recorded)")
                continue
            with reporter.trial(f"kl-{label.replace(' ', '-')}") as trial:
                loss = trial_loss(parent_model, teacher_model, stage_data, data, train_cfg, precision, seed,
                                  converted, metrics_callback(trial, f"kl {label}"))
            trials[key] = loss
            _record(work_dir, trials)
            reporter.progress(f"  kl {label}: distillation loss {loss:.4f}")
        reference = trials[ALL_CONVERTED]
        ranking = rank_by_fall(reference, {layer: trials[str(layer)] for layer in layers})
        for entry in ranking:
            reporter.log_metrics({"kl/loss": entry["loss"], "kl/fall": entry["kl_fall"]}, step=entry["layer"])
    else:
        reference, ranking = None, [{"layer": layers[0], "kl_fall": 0.0, "loss": None}]
        reporter.progress(f"  kl: one attention layer left ({layers[0]}): nothing to compare, no trial")
    result = {"n_mamba": n_mamba, "steps": train_cfg.steps, "score_window": train_cfg.loss_window,
              "trials": len(layers) + 1 if len(layers) > 1 else 0, "all_converted_loss": reference,
              "ranking": ranking}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / KL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    falls = {entry["layer"]: entry["kl_fall"] for entry in ranking}
    bar_plot([falls[layer] for layer in layers], [str(layer) for layer in layers],
             title=f"KL-guided: KL fall with the layer kept as attention (from H-{n_mamba})",
             ylabel="KL(all converted) - KL(kept)", path=out_dir / KL_PLOT)
    for name in (KL_FILE, KL_PLOT):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "kl", parent=f"H-{n_mamba}", started=started, ranking=[entry["layer"] for entry in ranking],
               all_converted_loss=reference)
    return result


def choose_layers(table: dict, attention: set[int], count: int, current: int) -> list[int]:
    """The layers a step to `count` converted layers takes from a kl.json (its first entries), checked
    against the parent's attention layers (`attention`) and converted count (`current`)."""
    if count <= current:
        raise StageError(f"step to {count} converted layers from a checkpoint that already has {current}")
    ranked = [int(entry["layer"]) for entry in table["ranking"]]
    stale = sorted(layer for layer in ranked if layer not in attention)
    if stale or table["n_mamba"] != current:
        raise StageError(f"step to {count}: the KL table scored layers {ranked} of H-{table['n_mamba']}, not the "
                         f"attention layers of the parent checkpoint (H-{current}): it belongs to another checkpoint")
    needed = count - current
    if needed > len(ranked):
        raise StageError(f"step to {count} converted layers needs {needed} more but only {len(ranked)} attention "
                         "layers remain")
    return sorted(ranked[:needed])


@stage("kl_step", version=1)
def run_kl_step(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, seed: int, count: int, *,
                teacher: str | Path, parent: str | Path, kl: str | Path, out_dir: str | Path, work_dir: str | Path,
                generic: str | Path | None = None, reporter: Reporter | None = None) -> dict:
    """H-K -> H-count like `run_step`, the next layers from the parent's KL-guided scoring (`kl`: the `kl`
    stage's output, the layers with the smallest KL fall first), converted to Mamba, then distillation."""
    kinds = layer_kinds_of(Path(parent))
    current = len(kinds["mamba"]) + len(kinds["gdn"])
    layers = choose_layers(json.loads((Path(kl) / KL_FILE).read_text()), set(kinds["attention"]), count, current)
    return convert_and_distil(train, data, hardware, seed, None, Path(teacher), Path(parent), layers, Path(out_dir),
                              work_dir=Path(work_dir), reporter=reporter or ConsoleReporter(), stage_name="kl_step",
                              extra={"selected_by": "kl"},
                              generic=Path(generic) if generic is not None else None)


__all__ = ["ALL_CONVERTED", "KL_FILE", "KL_PLOT", "TRIALS_FILE", "choose_layers", "rank_by_fall", "run_kl",
           "run_kl_step", "trial_loss"]
