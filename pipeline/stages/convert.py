"""Conversions: the first (K least LOO-important layers -> Mamba) and each progressive step (next MMR group).

Both MIL-initialise the chosen layers in the parent (the teacher, or the previous hybrid) and distil the
result end to end from the teacher (cfg.train: reverse KL at T=1 by default). Training state lives in
`work_dir` and is saved every `train.save_every` steps, so a killed conversion resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import RunConfig, checkpoint_name, to_plain
from pipeline.convert import hybridize
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    StageError,
    cumulative_train_tokens,
    distill_kind,
    load_model,
    load_tokenizer,
    metrics_callback,
    parent_checkpoint,
    save_checkpoint,
    write_meta,
)
from pipeline.train import train


def mamba_options(cfg: RunConfig) -> dict:
    return {"d_state": cfg.mamba.d_state, "dt_rank": cfg.mamba.dt_rank, "d_conv": cfg.mamba.d_conv,
            "gqa_expansion": cfg.mamba.gqa_expansion}


def convert_and_distil(cfg: RunConfig, teacher_dir: Path, parent_dir: Path, new_layers: list[int], out_dir: Path,
                       *, work_dir: Path, reporter: Reporter, stage: str, extra: dict) -> dict:
    started = time.time()
    teacher = load_model(teacher_dir, cfg, "teacher")
    parent = teacher if parent_dir == teacher_dir else load_model(parent_dir, cfg, "parent checkpoint")
    is_first = parent is teacher
    student = hybridize(parent, new_layers, seed=cfg.seed, **(mamba_options(cfg) if is_first else {}))
    if not is_first:
        del parent
    n_mamba = len(student.config.mamba_layers)
    name = checkpoint_name(n_mamba)
    reporter.progress(f"  {name}: layers {new_layers} -> Mamba, pattern {student.config.layer_pattern}")
    tokenizer = load_tokenizer(teacher_dir)
    data = StageData(cfg, tokenizer)
    result = train(
        student, data.batch_source(distill_kind(cfg), cfg.train.batch_size, cfg.train.seed), cfg.train,
        teacher=teacher, state_dir=work_dir / "train_state", callback=metrics_callback(reporter, name),
    )
    save_checkpoint(student, tokenizer, out_dir)
    meta = write_meta(
        out_dir, stage, cfg, parent=str(parent_dir), started=started, checkpoint=name, n_mamba=n_mamba,
        layer_types=student.config.layer_types, layer_pattern=student.config.layer_pattern,
        converted_layers=new_layers, train={**to_plain(cfg.train)}, steps=result.steps_done,
        tokens_seen=result.tokens_seen, cumulative_train_tokens=cumulative_train_tokens(parent_dir, result.tokens_seen),
        parent_checkpoint=parent_checkpoint(parent_dir),
        data=data.describe(distill_kind(cfg)), final_distill_loss=result.final_distill_loss, **extra,
    )
    reporter.log_metrics({"final_distill_loss": result.final_distill_loss, "n_mamba": n_mamba})
    return meta


def run_convert(cfg: RunConfig, teacher_dir: str | Path, loo_dir: str | Path, out_dir: str | Path, *,
                work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """H-first: the counts[0] least important layers by LOO become Mamba, then distillation."""
    from pipeline.stages.loo import LOO_FILE, rank_layers

    loo = json.loads((Path(loo_dir) / LOO_FILE).read_text())
    count = cfg.schedule.counts[0]
    if count > len(loo["ranking"]):
        raise StageError(f"schedule.counts[0]={count} exceeds the teacher's {len(loo['ranking'])} layers")
    layers = sorted(rank_layers(loo)[:count])
    return convert_and_distil(cfg, Path(teacher_dir), Path(teacher_dir), layers, Path(out_dir),
                              work_dir=Path(work_dir), reporter=reporter or ConsoleReporter(), stage="convert",
                              extra={"selected_by": "loo"})


def run_step(cfg: RunConfig, teacher_dir: str | Path, parent_dir: str | Path, mmr_dir: str | Path, count: int,
             out_dir: str | Path, *, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """H-K -> H-count: the lowest-MMR attention layers of the parent become Mamba, then distillation."""
    from pipeline.stages.mmr import MMR_FILE

    mmr = json.loads((Path(mmr_dir) / MMR_FILE).read_text())
    current = mmr["n_mamba"]
    if count <= current:
        raise StageError(f"step to {count} Mamba layers from a checkpoint that already has {current}")
    needed = count - current
    ranked = [entry["layer"] for entry in mmr["ranking"]]
    if needed > len(ranked):
        raise StageError(f"step to {count} Mamba layers needs {needed} more but only {len(ranked)} attention layers remain")
    layers = sorted(ranked[:needed])
    return convert_and_distil(cfg, Path(teacher_dir), Path(parent_dir), layers, Path(out_dir),
                              work_dir=Path(work_dir), reporter=reporter or ConsoleReporter(), stage="step",
                              extra={"selected_by": "mmr"})


__all__ = ["convert_and_distil", "mamba_options", "run_convert", "run_step"]
