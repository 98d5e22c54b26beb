"""End-to-end SFT of a chosen hybrid on chat data (loss on assistant tokens)."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import RunConfig, to_plain
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    cumulative_train_tokens,
    load_model,
    load_tokenizer,
    metrics_callback,
    parent_checkpoint,
    read_meta,
    save_checkpoint,
    write_meta,
)
from pipeline.train import train


def run_sft(cfg: RunConfig, checkpoint_dir: str | Path, out_dir: str | Path, *, work_dir: str | Path,
            reporter: Reporter | None = None) -> dict:
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    model = load_model(checkpoint_dir, cfg, "SFT input checkpoint")
    tokenizer = load_tokenizer(checkpoint_dir)
    data = StageData(cfg, tokenizer)
    name = f"{read_meta(checkpoint_dir).get('checkpoint', Path(checkpoint_dir).name)}-SFT"
    reporter.progress(f"  {name}: SFT of {model.config.layer_pattern}")
    result = train(model, data.batch_source("sft", cfg.sft.train.batch_size, cfg.sft.train.seed), cfg.sft.train,
                   state_dir=Path(work_dir) / "train_state", callback=metrics_callback(reporter, name))
    save_checkpoint(model, tokenizer, out_dir)
    config = model.config
    return write_meta(
        out_dir, "sft", cfg, parent=str(checkpoint_dir), started=started, checkpoint=name,
        n_mamba=len(getattr(config, "mamba_layers", [])), layer_types=list(config.layer_types),
        layer_pattern=getattr(config, "layer_pattern", None), train=to_plain(cfg.sft.train),
        steps=result.steps_done, tokens_seen=result.tokens_seen,
        cumulative_train_tokens=cumulative_train_tokens(checkpoint_dir, result.tokens_seen),
        parent_checkpoint=parent_checkpoint(checkpoint_dir),
        data=data.describe("sft"), final_loss=result.final_loss,
    )


__all__ = ["run_sft"]
