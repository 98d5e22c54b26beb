"""End-to-end SFT of a chosen hybrid on chat data (loss on assistant tokens)."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import DataConfig, HardwareConfig, to_plain
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    cumulative_train_tokens,
    load_model,
    load_tokenizer,
    metrics_callback,
    read_meta,
    resolve_device,
    resolve_precision,
    save_checkpoint,
    stage,
    write_meta,
)
from pipeline.stages.launch import TrainingJob, train_under_torchrun, uses_torchrun
from pipeline.train import TrainConfig
from pipeline.train import train as _train


@stage("sft", version=3)
def run_sft(train: TrainConfig, data: DataConfig, hardware: HardwareConfig, *, checkpoint: str | Path,
            out_dir: str | Path, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """`train` (sft.train) on data.sft, starting from `checkpoint` (the one sft.checkpoint names)."""
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    model = load_model(checkpoint, hardware, "SFT input checkpoint", fp32=True)  # fp32 master weights
    tokenizer = load_tokenizer(checkpoint)
    stage_data = StageData(data, tokenizer)
    source = read_meta(checkpoint).get("checkpoint", Path(checkpoint).name)
    name = f"{source}-SFT"
    reporter.progress(f"  {name}: SFT of {model.config.layer_pattern}")
    state_dir = Path(work_dir) / "train_state"
    if uses_torchrun(hardware, state_dir, train):
        job = TrainingJob(train=train, data=data, batches="sft", state_dir=str(state_dir),
                          precision=resolve_precision(hardware), device=resolve_device(hardware).type)
        result = train_under_torchrun(model, tokenizer, job, hardware=hardware, work_dir=Path(work_dir),
                                      reporter=reporter, label=name)
    else:
        result = _train(model, stage_data.batch_source("sft", train.batch_size, train.seed), train,
                        state_dir=state_dir, callback=metrics_callback(reporter, name),
                        precision=resolve_precision(hardware))
    save_checkpoint(model, tokenizer, out_dir, train.save_dtype)
    config = model.config
    return write_meta(
        out_dir, "sft", {"train": train, "data": data, "hardware": hardware}, parent=source, started=started,
        checkpoint=name, n_mamba=len(getattr(config, "mamba_layers", [])), layer_types=list(config.layer_types),
        **({"n_gdn": len(config.gdn_layers)} if getattr(config, "gdn_layers", None) else {}),
        layer_pattern=getattr(config, "layer_pattern", None), train=to_plain(train),
        steps=result.steps_done, tokens_seen=result.tokens_seen,
        cumulative_train_tokens=cumulative_train_tokens(checkpoint, result.tokens_seen),
        data=stage_data.describe("sft"), final_loss=result.final_loss,
    )


__all__ = ["run_sft"]
