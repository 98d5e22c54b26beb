"""MIL-Mamba-Replacement scoring: how easily each remaining attention layer becomes Mamba.

For each attention layer of the parent hybrid: MIL-initialise that layer alone, train only its new
mixer for `mmr.steps` steps of distillation from the teacher, and record the mean distillation loss of
the last `mmr.score_window` steps. Low loss = easy to replace. Each finished trial is recorded in
`work_dir`, so a killed MMR stage resumes at the next layer. Writes mmr.json and mmr.png.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.convert import hybridize
from pipeline.evaluate.plots import bar_plot
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    distill_kind,
    load_model,
    load_tokenizer,
    metrics_callback,
    write_meta,
)
from pipeline.train import train

MMR_FILE = "mmr.json"


def trial_config(cfg: RunConfig):
    return dataclasses.replace(
        cfg.train, steps=cfg.mmr.steps, lr=cfg.mmr.lr, batch_size=cfg.mmr.batch_size,
        warmup_steps=min(cfg.train.warmup_steps, cfg.mmr.steps // 10), trainable="mamba",
        loss_window=cfg.mmr.score_window, save_every=0, log_every=max(cfg.mmr.steps // 4, 1),
    )


def rank_candidates(trials: dict[int, float]) -> list[dict]:
    """Trials sorted from easiest (lowest loss) to hardest; ties by layer index."""
    return [{"layer": layer, "loss": loss} for layer, loss in sorted(trials.items(), key=lambda kv: (kv[1], kv[0]))]


def run_mmr(cfg: RunConfig, teacher_dir: str | Path, parent_dir: str | Path, out_dir: str | Path, *,
            work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    reporter = reporter or ConsoleReporter()
    started, out_dir, work_dir = time.time(), Path(out_dir), Path(work_dir)
    teacher = load_model(teacher_dir, cfg, "teacher")
    parent = load_model(parent_dir, cfg, "parent checkpoint")
    data = StageData(cfg, load_tokenizer(teacher_dir))
    candidates = parent.config.attention_layers
    done_path = work_dir / "trials.json"
    trials = {int(k): v for k, v in json.loads(done_path.read_text()).items()} if done_path.exists() else {}
    train_cfg = trial_config(cfg)
    for layer in candidates:
        if layer in trials:
            reporter.progress(f"  mmr layer {layer}: {trials[layer]:.4f} (recorded)")
            continue
        student = hybridize(parent, [layer], seed=cfg.seed)
        prefix = f"model.layers.{layer}.mixer."
        with reporter.trial(f"layer-{layer}") as trial:  # its curves: train/... in a run of its own
            result = train(
                student, data.batch_source(distill_kind(cfg), train_cfg.batch_size, train_cfg.seed), train_cfg,
                teacher=teacher, callback=metrics_callback(trial, f"mmr layer {layer}"),
                trainable_filter=lambda name, _param, prefix=prefix: name.startswith(prefix),
            )
        trials[layer] = result.final_distill_loss
        work_dir.mkdir(parents=True, exist_ok=True)
        done_path.write_text(json.dumps(trials))
        reporter.log_metrics({"mmr/loss": result.final_distill_loss}, step=layer)
        reporter.progress(f"  mmr layer {layer}: distillation loss {result.final_distill_loss:.4f}")
        del student
    ranking = rank_candidates(trials)
    result = {"parent": str(parent_dir), "n_mamba": len(parent.config.mamba_layers), "steps": cfg.mmr.steps,
              "score_window": cfg.mmr.score_window, "ranking": ranking}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MMR_FILE).write_text(json.dumps(result, indent=2) + "\n")
    bar_plot([trials[layer] for layer in candidates], [str(layer) for layer in candidates],
             title=f"MMR: distillation loss after {cfg.mmr.steps} steps (from H-{result['n_mamba']})",
             ylabel="mean distillation loss", path=out_dir / "mmr.png")
    for name in (MMR_FILE, "mmr.png"):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "mmr", cfg, parent=str(parent_dir), started=started, ranking=ranking)
    return result


__all__ = ["MMR_FILE", "rank_candidates", "run_mmr", "trial_config"]
