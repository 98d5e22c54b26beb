"""End-to-end SFT on chat data (loss on assistant tokens): of a chosen hybrid, and of a user's teacher before
anything else (`teacher.finetune`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.config import DataConfig, HardwareConfig, to_plain
from pipeline.data.stage_data import StageData
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
from pipeline.stages.launch import TrainingPlan, builds_sharded, check_source, fit
from pipeline.train import TrainConfig


def _fine_tune(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, checkpoint: str | Path,
               out_dir: Path, work_dir: str | Path, reporter: Reporter, stage_name: str, name: str,
               parent: str) -> dict:
    """SFT of the model at `checkpoint` with `train` on data.sft (loss on assistant tokens), saved to
    `out_dir` as checkpoint `name`: the body of the SFT stage and of the teacher's fine-tuning."""
    started = time.time()
    what = "SFT input checkpoint" if stage_name == "sft" else "teacher to fine-tune"
    plan = TrainingPlan(train, data, "sft", str(work_dir), tokenizer_dir=str(checkpoint))
    runtime = plan.runtime(hardware)
    sharded = runtime.torchrun and builds_sharded(checkpoint)
    # under torchrun the ranks build the model sharded from its files (this process holds its meta copy)
    model = (check_source(ModelSource(str(checkpoint)), torch.float32, what) if sharded
             else load_model(checkpoint, runtime, what, fp32=True))  # fp32 master weights
    tokenizer = load_tokenizer(checkpoint)
    stage_data = StageData(data, tokenizer)
    config = model.config
    reporter.progress(f"  {name}: SFT of {getattr(config, 'layer_pattern', None) or type(model).__name__}")
    result = fit(ModelSource(str(checkpoint)) if sharded else model, tokenizer, plan, runtime, reporter=reporter,
                 label=name, out_dir=out_dir, what=what)
    pattern = {"layers": config.num_hidden_layers}  # a plain teacher: all attention
    if hasattr(config, "layer_types") and hasattr(config, "mamba_layers"):  # a hybrid
        pattern = {"n_mamba": len(config.mamba_layers), "layer_types": list(config.layer_types),
                   "layer_pattern": config.layer_pattern}
        if getattr(config, "gdn_layers", None):  # only then: a Mamba-only stage.json is as it always was
            pattern["n_gdn"] = len(config.gdn_layers)
    return write_meta(
        out_dir, stage_name, parent=parent,
        started=started, checkpoint=name, **pattern, train=to_plain(train),
        steps=result.steps_done, tokens_seen=result.tokens_seen,
        cumulative_train_tokens=cumulative_train_tokens(checkpoint, result.tokens_seen),
        data=stage_data.describe("sft"), final_loss=result.final_loss,
    )


@stage("sft", version=3)
def run_sft(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, *, checkpoint: str | Path,
            out_dir: str | Path, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """`train` (sft.train) on data.sft, starting from `checkpoint` (the one sft.checkpoint names)."""
    source = read_meta(checkpoint).get("checkpoint", Path(checkpoint).name)
    return _fine_tune(train, data, hardware, checkpoint, Path(out_dir), work_dir, reporter or ConsoleReporter(),
                      "sft", f"{source}-SFT", source)


@stage("teacher_finetune", version=1)
def run_teacher_finetune(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, *, teacher: str | Path,
                         out_dir: str | Path, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """The user's teacher fine-tuned with `train` (teacher.finetune.train) on data.sft before anything
    else; the result is the run's teacher (checkpoint name "teacher"), its own pre-training not counted
    in the lineage's tokens."""
    return _fine_tune(train, data, hardware, teacher, Path(out_dir), work_dir, reporter or ConsoleReporter(),
                      "teacher_finetune", "teacher", "teacher")


__all__ = ["run_sft", "run_teacher_finetune"]
