"""Conversions: the first (K least LOO-important layers -> Mamba, or `schedule.mixers[0]`) and each
progressive step (the next MMR group, each layer with the mixer its lowest MMR score was for).

Both initialise the chosen layers from their attention in the parent (the teacher, or the previous
hybrid: MIL for Mamba, `gdn_from_attention` for Gated DeltaNet) and distil the result end to end from the
teacher (`train`: reverse KL at T=1 by default). Training state lives in `work_dir` and is saved every
`train.save_every` steps, so a killed conversion resumes where it stopped. Under torchrun (hardware.nproc
> 1) this process loads no model: the ranks build the student (the same initial weights) and the teacher
sharded from the files and write the checkpoint (`pipeline.stages.launch.fit`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import DataConfig, GDNConfig, HardwareConfig, MambaConfig, checkpoint_name, to_plain
from pipeline.convert import hybridize
from pipeline.data.stage_data import StageData, distillation_source
from pipeline.errors import StageError
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    cumulative_train_tokens,
    load_model,
    load_tokenizer,
    read_meta,
    stage,
    write_meta,
)
from pipeline.convert.sharded import ModelSource
from pipeline.model.checkpoint import layer_kinds_of
from pipeline.stages.launch import TrainingPlan, builds_sharded, check_source, fit
from pipeline.train import TrainConfig


def mamba_options(mamba: MambaConfig) -> dict:
    return {"d_state": mamba.d_state, "dt_rank": mamba.dt_rank, "d_conv": mamba.d_conv,
            "gqa_expansion": mamba.gqa_expansion}


def gdn_options(gdn: GDNConfig | None) -> dict:
    """hybridize's gdn_options from the gdn section (None: not read by this stage, the defaults)."""
    return {} if gdn is None else {"conv_kernel": gdn.d_conv}


def converted_count(config) -> int:
    """K of H-K: the layers a conversion made (Mamba and Gated DeltaNet)."""
    return len(getattr(config, "recurrent_layers", None) or getattr(config, "mamba_layers", None) or [])


def convert_and_distil(train_cfg: TrainConfig, data: DataConfig, hardware: HardwareConfig, seed: int,
                       mamba: MambaConfig | None, teacher_dir: Path, parent_dir: Path | None, new_layers: list[int],
                       out_dir: Path, *, work_dir: Path, reporter: Reporter, stage_name: str, extra: dict,
                       mixers: dict[int, str] | None = None, gdn: GDNConfig | None = None,
                       generic: Path | None = None) -> dict:
    """`parent_dir` None: convert the teacher itself (with `mamba`'s mixer settings, unless the teacher is
    already a hybrid); else a hybrid, whose new mixers take the settings of its existing ones. `generic`:
    the teacher's samples (data.generic=teacher), the generic text of a distillation on generic text or a mix.
    `mixers`: layer -> "mamba" or "gdn" for each of `new_layers` (None: all Mamba); new Gated DeltaNet layers
    take `gdn`'s settings unless the parent has some already."""
    started = time.time()
    source_dir = teacher_dir if parent_dir is None else parent_dir
    what = "teacher" if parent_dir is None else "parent checkpoint"
    tokenizer = load_tokenizer(teacher_dir)
    stage_data = StageData(data, tokenizer).with_generic(generic)
    # the teacher is fit's to load (frozen: bf16 under bf16-mixed; under torchrun each rank builds its own)
    plan = TrainingPlan(train_cfg, stage_data.data, distillation_source(data), str(work_dir),
                        teacher_dir=str(teacher_dir), tokenizer_dir=str(teacher_dir))
    runtime = plan.runtime(hardware)
    # under torchrun the ranks build teacher and student sharded from the files: this process loads neither
    sharded = runtime.torchrun and builds_sharded(source_dir)
    parent = (check_source(ModelSource(str(source_dir)), torch.float32, what) if sharded
              else load_model(source_dir, runtime, what, fp32=True))  # fp32 masters
    attention = getattr(parent.config, "attention_layers", None)  # None: a plain teacher, all attention
    occupied = [] if attention is None else [layer for layer in new_layers if layer not in attention]
    if occupied:  # hybridize would refuse too; this names the stage's inputs
        raise StageError(f"{stage_name}: layers {occupied} are already Mamba (or identity) in "
                         f"{'the teacher' if parent_dir is None else 'the parent checkpoint'}; only attention "
                         "layers are converted")
    # a hybrid (a step's parent, or a teacher that is already a hybrid) keeps its own Mamba settings
    fresh = parent_dir is None and not getattr(parent.config, "mamba_layers", None)
    kinds = {layer: (mixers or {}).get(layer, "mamba") for layer in new_layers}
    new_mamba = [layer for layer in new_layers if kinds[layer] == "mamba"]
    new_gdn = [layer for layer in new_layers if kinds[layer] == "gdn"]
    options = mamba_options(mamba) if fresh else {}
    if sharded:
        source = ModelSource(str(source_dir), tuple(new_mamba), seed, options, tuple(new_gdn),
                             gdn_options(gdn) if new_gdn else {})
        student = check_source(source, torch.float32, what)  # the meta student: its config, no weights
    else:
        student = hybridize(parent, new_mamba, seed=seed, **options,
                            **({"gdn_layers": new_gdn, "gdn_options": gdn_options(gdn)} if new_gdn else {}))
    del parent
    n_mamba, n_gdn = len(student.config.mamba_layers), len(getattr(student.config, "gdn_layers", []))
    name = checkpoint_name(converted_count(student.config))
    if new_gdn:
        reporter.progress(f"  {name}: layers {new_mamba} -> Mamba, {new_gdn} -> Gated DeltaNet, pattern "
                          f"{student.config.layer_pattern}")
    else:
        reporter.progress(f"  {name}: layers {new_layers} -> Mamba, pattern {student.config.layer_pattern}")
    if n_gdn:  # recorded only where there is Gated DeltaNet: a Mamba-only stage.json is as it always was
        extra = {**extra, "n_gdn": n_gdn, "converted_mixers": {str(layer): kinds[layer] for layer in new_layers}}
    result = fit(source if sharded else student, tokenizer, plan, runtime, reporter=reporter, label=name,
                 out_dir=out_dir, what=what)
    meta = write_meta(
        out_dir, stage_name, parent="teacher" if parent_dir is None
        else read_meta(parent_dir).get("checkpoint") or checkpoint_name(converted_count(student.config) - len(new_layers)),
        started=started, checkpoint=name, n_mamba=n_mamba,
        layer_types=student.config.layer_types, layer_pattern=student.config.layer_pattern,
        converted_layers=new_layers, train=to_plain(train_cfg), steps=result.steps_done,
        tokens_seen=result.tokens_seen, cumulative_train_tokens=cumulative_train_tokens(parent_dir, result.tokens_seen),
        data=stage_data.describe(distillation_source(data)), final_distill_loss=result.final_distill_loss, **extra,
    )
    reporter.log_metrics({"final_distill_loss": result.final_distill_loss, "n_mamba": n_mamba})
    return meta


@stage("convert", version=4)
def run_convert(train: TrainConfig, mamba: MambaConfig, data: DataConfig, hardware: HardwareConfig, seed: int,
                count: int, mixer: str = "mamba", gdn: GDNConfig | None = None, *, teacher: str | Path,
                loo: str | Path, out_dir: str | Path, work_dir: str | Path, generic: str | Path | None = None,
                reporter: Reporter | None = None) -> dict:
    """H-first: the least important attention layers by LOO become `mixer` (Mamba, or "gdn": Gated DeltaNet
    with `gdn`'s settings), as many as make `count` converted layers (all `count` for a plain teacher; a
    hybrid teacher's own converted layers count and stay), then distillation. `mixer` and `gdn` are given
    only by a run whose first mixer is not Mamba (`schedule.mixers[0]`), so Mamba runs keep their keys.
    `generic` (an input only when data.generic=teacher and the distillation reads generic text): the
    teacher's samples folder."""
    from pipeline.stages.loo import LOO_FILE, rank_layers

    table = json.loads((Path(loo) / LOO_FILE).read_text())
    already = len(table.get("mamba_layers", []))
    if count <= already:
        raise StageError(f"schedule.counts[0]={count}: the teacher already has {already} Mamba layers; "
                         "every count must be larger")
    ranking = rank_layers(table)
    if count - already > len(ranking):
        raise StageError(f"schedule.counts[0]={count} exceeds the teacher's {len(ranking) + already} layers")
    layers = sorted(ranking[:count - already])
    return convert_and_distil(train, data, hardware, seed, mamba, Path(teacher), None, layers, Path(out_dir),
                              work_dir=Path(work_dir), reporter=reporter or ConsoleReporter(), stage_name="convert",
                              extra={"selected_by": "loo"},
                              mixers={layer: mixer for layer in layers}, gdn=gdn,
                              generic=Path(generic) if generic is not None else None)


@stage("step", version=4)
def run_step(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, seed: int, count: int,
             gdn: GDNConfig | None = None, *, teacher: str | Path, parent: str | Path, mmr: str | Path,
             out_dir: str | Path, work_dir: str | Path, generic: str | Path | None = None,
             reporter: Reporter | None = None) -> dict:
    """H-K -> H-count: the lowest-MMR attention layers of the parent become the mixer of their lowest
    (layer, mixer) pair (`pipeline.stages.mmr.choose_conversions`), then distillation. `gdn`: the settings
    of new Gated DeltaNet layers in a parent without any (given only by a run whose schedule.mixers lists
    "gdn")."""
    from pipeline.stages.mmr import MMR_FILE, choose_conversions

    table = json.loads((Path(mmr) / MMR_FILE).read_text())
    current = table["n_mamba"] + table.get("n_gdn", 0)
    if count <= current:
        raise StageError(f"step to {count} converted layers from a checkpoint that already has {current}")
    needed = count - current
    ranked = [entry["layer"] for entry in table["ranking"]]
    attention = set(layer_kinds_of(Path(parent))["attention"])
    stale = sorted({layer for layer in ranked if layer not in attention})
    if stale:
        raise StageError(f"step to {count}: MMR scored layers {stale}, which are not attention layers of the "
                         "parent checkpoint (the MMR table belongs to another checkpoint)")
    chosen = choose_conversions(table["ranking"], needed)
    if needed > len(chosen):
        raise StageError(f"step to {count} converted layers needs {needed} more but only {len(chosen)} attention "
                         "layers remain")
    layers = sorted(chosen)
    return convert_and_distil(train, data, hardware, seed, None, Path(teacher), Path(parent), layers, Path(out_dir),
                              work_dir=Path(work_dir), reporter=reporter or ConsoleReporter(), stage_name="step",
                              extra={"selected_by": "mmr"}, mixers=chosen, gdn=gdn,
                              generic=Path(generic) if generic is not None else None)


@stage("loo_step", version=2)
def run_loo_step(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, seed: int, count: int, *,
                 teacher: str | Path, parent: str | Path, loo: str | Path, out_dir: str | Path, work_dir: str | Path,
                 generic: str | Path | None = None, reporter: Reporter | None = None) -> dict:
    """H-K -> H-count like `run_step`, but the next layers come from the teacher's static LOO ranking (the
    least important attention layers of the parent) instead of an MMR scoring of the parent: the ordering
    the recipe replaces by MMR past about 50% conversion (the ablation's comparison)."""
    from pipeline.stages.loo import LOO_FILE, rank_layers

    kinds = layer_kinds_of(Path(parent))
    attention = set(kinds["attention"])
    current = len(kinds["mamba"]) + len(kinds["gdn"])
    if count <= current:
        raise StageError(f"step to {count} Mamba layers from a checkpoint that already has {current}")
    ranked = [layer for layer in rank_layers(json.loads((Path(loo) / LOO_FILE).read_text())) if layer in attention]
    needed = count - current
    if needed > len(ranked):
        raise StageError(f"step to {count} Mamba layers needs {needed} more but only {len(ranked)} attention "
                         "layers remain")
    layers = sorted(ranked[:needed])
    return convert_and_distil(train, data, hardware, seed, None, Path(teacher), Path(parent), layers, Path(out_dir),
                              work_dir=Path(work_dir), reporter=reporter or ConsoleReporter(), stage_name="loo_step",
                              extra={"selected_by": "loo"},
                              generic=Path(generic) if generic is not None else None)


__all__ = ["convert_and_distil", "converted_count", "gdn_options", "layer_kinds_of", "mamba_options", "run_convert",
           "run_loo_step", "run_step"]
