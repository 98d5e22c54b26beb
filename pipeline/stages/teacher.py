"""Register the teacher: a user's transformers checkpoint, or the bundled demo teacher trained here.

A user's teacher (`source`, a local folder; the orchestration layer downloads s3:// URIs first) is
loaded, checked to be a supported architecture, and saved in the standard layout (safetensors) with its
tokenizer. The demo teacher is a small Llama (GQA) with a character tokenizer, trained with the project's
one training loop (settings: teacher.demo.train) on the bundled reasoning traces, optionally mixed with
the generic text corpus. Its answer accuracy is measured by the evaluation stage, with every checkpoint.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from pipeline.config import DataConfig, HardwareConfig
from pipeline.data.demo import DemoTeacherConfig
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    check_vocabulary,
    load_model,
    load_tokenizer,
    metrics_callback,
    resolve_device,
    resolve_precision,
    save_checkpoint,
    stage,
    write_meta,
)
from pipeline.stages.launch import TrainingJob, train_under_torchrun, uses_torchrun
from pipeline.train import TrainConfig, train


def _mixed_source(data: StageData, train_cfg: TrainConfig, generic_every: int):
    """Reasoning batches with every `generic_every`-th batch from the generic corpus (0 = reasoning only)."""
    reasoning = data.batch_source("distill", train_cfg.batch_size, train_cfg.seed)
    if not generic_every:
        return reasoning
    generic = data.batch_source("generic", train_cfg.batch_size, train_cfg.seed + 1)

    def from_position(position: int):
        reasoning_it = reasoning(position - position // generic_every)  # batches 0..position-1: every
        generic_it = generic(position // generic_every)  # generic_every-th of them was generic
        index = position
        while True:
            yield next(generic_it) if (index + 1) % generic_every == 0 else next(reasoning_it)
            index += 1

    return from_position


@stage("teacher", version=1)
def import_teacher(hardware: HardwareConfig, *, source: str | Path, out_dir: str | Path, work_dir: str | Path,
                   reporter: Reporter | None = None) -> dict:
    """A user's teacher folder, checked and saved in the standard layout."""
    from pipeline.convert import check_teacher

    started, out_dir = time.time(), Path(out_dir)
    model = load_model(source, hardware, "teacher")
    check_teacher(model)
    tokenizer = load_tokenizer(source)
    check_vocabulary(model, tokenizer, f"teacher at {source}")
    save_checkpoint(model, tokenizer, out_dir)
    pattern = {}  # a hybrid as the teacher (a released one): its own pattern, not all attention
    if getattr(model.config, "mamba_layers", None):
        pattern = {"layer_pattern": model.config.layer_pattern, "n_mamba": len(model.config.mamba_layers)}
    return write_meta(out_dir, "teacher", {"hardware": hardware}, parent=None, started=started,
                      checkpoint="teacher", source="user", architecture=type(model).__name__,
                      layers=model.config.num_hidden_layers, **pattern)


@stage("teacher", version=2)
def run_teacher(demo: DemoTeacherConfig, data: DataConfig, hardware: HardwareConfig, *, out_dir: str | Path,
                work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """The demo teacher, trained from scratch with `demo.train` on `data` (distill, and generic if mixed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data import build_char_tokenizer

    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    train_cfg = demo.train
    tokenizer = build_char_tokenizer()
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(**demo.llama_config_kwargs(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))).to(resolve_device(hardware))
    stage_data = StageData(data, tokenizer)
    reporter.progress(f"  demo teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                      f"{train_cfg.steps} steps")
    state_dir = Path(work_dir) / "train_state"
    if uses_torchrun(hardware, state_dir, train_cfg):
        job = TrainingJob(train=train_cfg, data=data, batches="teacher", state_dir=str(state_dir),
                          precision=resolve_precision(hardware), device=resolve_device(hardware).type,
                          generic_every=demo.generic_every)
        result = train_under_torchrun(model, tokenizer, job, hardware=hardware, work_dir=Path(work_dir),
                                      reporter=reporter, label="teacher")
    else:
        result = train(model, _mixed_source(stage_data, train_cfg, demo.generic_every), train_cfg,
                       state_dir=state_dir, callback=metrics_callback(reporter, "teacher"),
                       precision=resolve_precision(hardware))
    save_checkpoint(model, tokenizer, out_dir, train_cfg.save_dtype)
    return write_meta(out_dir, "teacher", {"demo": demo, "data": data, "hardware": hardware}, parent=None,
                      started=started, checkpoint="teacher", source="demo", architecture="LlamaForCausalLM",
                      layers=model.config.num_hidden_layers, steps=result.steps_done, final_loss=result.final_loss)


__all__ = ["import_teacher", "run_teacher"]
