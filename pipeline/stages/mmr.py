"""MIL-Mamba-Replacement scoring: how easily each remaining attention layer becomes Mamba.

For each attention layer of the parent hybrid: MIL-initialise that layer alone (swapped into the parent in
place: one mixer, not a copy of the model; `pipeline.convert.mamba_trial`), train only its new
mixer for `mmr.train.steps` steps of distillation from the teacher, and record the mean distillation loss
of the last `mmr.train.loss_window` steps. Low loss = easy to replace. Each finished trial is recorded in
`work_dir`, so a killed MMR stage resumes at the next layer. Writes mmr.json and mmr.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import DataConfig, HardwareConfig, MMRConfig
from pipeline.convert import mamba_trial
from pipeline.evaluate.plots import bar_plot
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    distill_kind,
    load_model,
    load_tokenizer,
    metrics_callback,
    resolve_precision,
    stage,
    write_meta,
)
from pipeline.train import train

MMR_FILE = "mmr.json"


def rank_candidates(trials: dict[int, float]) -> list[dict]:
    """Trials sorted from easiest (lowest loss) to hardest; ties by layer index."""
    return [{"layer": layer, "loss": loss} for layer, loss in sorted(trials.items(), key=lambda kv: (kv[1], kv[0]))]


@stage("mmr", version=4)
def run_mmr(mmr: MMRConfig, data: DataConfig, hardware: HardwareConfig, seed: int, *, teacher: str | Path,
            parent: str | Path, out_dir: str | Path, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    reporter = reporter or ConsoleReporter()
    started, out_dir, work_dir = time.time(), Path(out_dir), Path(work_dir)
    teacher_model = load_model(teacher, hardware, "teacher")  # frozen: bf16 under bf16-mixed
    parent_model = load_model(parent, hardware, "parent checkpoint", fp32=True)  # fp32: trials train its copies
    stage_data = StageData(data, load_tokenizer(teacher))
    candidates = parent_model.config.attention_layers
    done_path = work_dir / "trials.json"
    trials = {int(k): v for k, v in json.loads(done_path.read_text()).items()} if done_path.exists() else {}
    train_cfg = mmr.train
    for layer in candidates:
        if layer in trials:
            reporter.progress(f"  mmr layer {layer}: {trials[layer]:.4f} (recorded)")
            continue
        prefix = f"model.layers.{layer}.mixer."
        # the parent itself, with this one layer swapped for a MIL-initialised Mamba mixer (no copy of the model)
        with mamba_trial(parent_model, layer, seed=seed) as student, reporter.trial(f"layer-{layer}") as trial:
            result = train(
                student, stage_data.batch_source(distill_kind(data), train_cfg.batch_size, train_cfg.seed), train_cfg,
                teacher=teacher_model, callback=metrics_callback(trial, f"mmr layer {layer}"),
                trainable_filter=lambda name, _param, prefix=prefix: name.startswith(prefix),
                precision=resolve_precision(hardware),
            )
        trials[layer] = result.final_distill_loss
        work_dir.mkdir(parents=True, exist_ok=True)
        done_path.write_text(json.dumps(trials))
        reporter.log_metrics({"mmr/loss": result.final_distill_loss}, step=layer)
        reporter.progress(f"  mmr layer {layer}: distillation loss {result.final_distill_loss:.4f}")
    ranking = rank_candidates(trials)
    n_mamba = len(parent_model.config.mamba_layers)
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


__all__ = ["MMR_FILE", "rank_candidates", "run_mmr"]
