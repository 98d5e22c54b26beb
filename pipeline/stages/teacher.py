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
from pipeline.errors import StageError
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    check_vocabulary,
    load_model,
    load_tokenizer,
    save_checkpoint,
    stage,
    write_meta,
)
from pipeline.stages.launch import TrainingPlan, fit


@stage("teacher", version=1)
def import_teacher(hardware: HardwareConfig, *, source: str | Path, out_dir: str | Path, work_dir: str | Path,
                   reporter: Reporter | None = None) -> dict:
    """A user's teacher, checked and saved in the standard layout: a transformers folder (loaded as
    `load_model` loads every checkpoint), or a GGUF file (dequantised to fp32 by transformers' GGUF
    support and stored as safetensors with its tokenizer and chat template)."""
    from pipeline.convert import check_teacher
    from pipeline.model.gguf import GGUFError, load_gguf, read_header

    started, out_dir = time.time(), Path(out_dir)
    extra = {}
    if Path(source).is_file():  # the executor hands over a GGUF teacher as its file (chain.gguf_source)
        try:
            model, tokenizer = load_gguf(source)
        except GGUFError as error:
            raise StageError(f"teacher: {error}") from None
        extra = {"gguf": Path(source).name, "quantization": read_header(source).file_type}
    else:
        model, tokenizer = load_model(source, hardware, "teacher"), load_tokenizer(source)
    check_teacher(model)
    check_vocabulary(model, tokenizer, f"teacher at {source}")
    save_checkpoint(model, tokenizer, out_dir)
    if getattr(model.config, "recurrent_layers", None):  # a hybrid as the teacher (a released one): its own pattern
        extra.update(layer_pattern=model.config.layer_pattern, n_mamba=len(model.config.mamba_layers))
        if model.config.gdn_layers:
            extra["n_gdn"] = len(model.config.gdn_layers)
    return write_meta(out_dir, "teacher", parent=None, started=started,
                      checkpoint="teacher", source="gguf" if "gguf" in extra else "user",
                      architecture=type(model).__name__, layers=model.config.num_hidden_layers, **extra)


@stage("teacher", version=2)
def run_teacher(demo: DemoTeacherConfig, data: DataConfig, hardware: HardwareConfig, *, out_dir: str | Path,
                work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """The demo teacher, trained from scratch with `demo.train` on `data` (distill, and generic if mixed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data import build_char_tokenizer

    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    train_cfg = demo.train
    plan = TrainingPlan(train_cfg, data, "teacher", str(work_dir), generic_every=demo.generic_every)
    runtime = plan.runtime(hardware)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(**demo.llama_config_kwargs(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))).to(runtime.torch_device)
    reporter.progress(f"  demo teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                      f"{train_cfg.steps} steps")
    result = fit(model, tokenizer, plan, runtime, reporter=reporter, label="teacher", out_dir=out_dir)
    return write_meta(out_dir, "teacher", parent=None, started=started, checkpoint="teacher", source="demo",
                      architecture="LlamaForCausalLM",
                      layers=model.config.num_hidden_layers, steps=result.steps_done, final_loss=result.final_loss)


__all__ = ["import_teacher", "run_teacher"]
