"""Register the teacher: a user's transformers checkpoint, or the bundled demo teacher trained here.

A user's teacher (cfg.teacher.path, a local folder; the orchestration layer downloads s3:// URIs first)
is loaded, checked to be a supported architecture, and saved in the standard layout (safetensors) with
its tokenizer. The demo teacher is a small Llama (GQA) with a character tokenizer, trained with the
project's one training loop on the bundled reasoning traces mixed with the generic text corpus.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch

from pipeline.config import RunConfig, to_plain
from pipeline.convert import check_teacher
from pipeline.evaluate.quality import answer_accuracy
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    StageData,
    StageError,
    load_model,
    load_tokenizer,
    metrics_callback,
    resolve_device,
    resolve_precision,
    save_checkpoint,
    write_meta,
)
from pipeline.train import TrainConfig, train


def demo_train_config(cfg: RunConfig) -> TrainConfig:
    demo = cfg.teacher.demo
    return TrainConfig(
        steps=demo.steps, lr=demo.learning_rate, min_lr_ratio=demo.min_lr_ratio, warmup_steps=demo.warmup_steps,
        weight_decay=demo.weight_decay, betas=tuple(demo.betas), grad_clip=demo.grad_clip,
        batch_size=demo.batch_size, max_length=demo.max_length, seed=demo.seed, trainable="all", loss="ce",
        save_every=max(demo.steps // 10, 1), log_every=max(demo.steps // 15, 1),
    )


def _mixed_source(data: StageData, cfg: RunConfig, train_cfg: TrainConfig, generic_every: int):
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


def run_teacher(cfg: RunConfig, out_dir: str | Path, *, work_dir: str | Path,
                reporter: Reporter | None = None) -> dict:
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    if cfg.teacher.path:
        model = load_model(cfg.teacher.path, cfg, "teacher")
        check_teacher(model)
        tokenizer = load_tokenizer(cfg.teacher.path)
        save_checkpoint(model, tokenizer, out_dir)
        return write_meta(out_dir, "teacher", cfg, parent=str(cfg.teacher.path), started=started,
                          checkpoint="teacher", source="user", architecture=type(model).__name__,
                          layers=model.config.num_hidden_layers)

    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data import build_char_tokenizer

    demo = cfg.teacher.demo
    tokenizer = build_char_tokenizer()
    torch.manual_seed(demo.seed)
    random.seed(demo.seed)
    model = LlamaForCausalLM(LlamaConfig(**demo.llama_config_kwargs(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))).to(resolve_device(cfg))
    data = StageData(cfg, tokenizer)
    train_cfg = demo_train_config(cfg)
    reporter.progress(f"  demo teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                      f"{train_cfg.steps} steps")
    result = train(model, _mixed_source(data, cfg, train_cfg, demo.generic_every), train_cfg,
                   state_dir=Path(work_dir) / "train_state", callback=metrics_callback(reporter, "teacher"),
                   precision=resolve_precision(cfg))
    problems = data.eval_problems(cfg.evaluate.num_examples)
    accuracy, _ = answer_accuracy(model, tokenizer, problems, batch_size=cfg.evaluate.batch_size,
                                  max_new_tokens=cfg.evaluate.max_new_tokens)
    reporter.log_metrics({"teacher/answer_accuracy": accuracy})
    reporter.progress(f"  demo teacher: answer accuracy {accuracy:.3f} on {len(problems)} test problems")
    save_checkpoint(model, tokenizer, out_dir, train_cfg.save_dtype)
    return write_meta(out_dir, "teacher", cfg, parent=None, started=started, checkpoint="teacher", source="demo",
                      architecture="LlamaForCausalLM", layers=model.config.num_hidden_layers,
                      train=to_plain(train_cfg), steps=result.steps_done, final_loss=result.final_loss,
                      answer_accuracy=accuracy, demo=dataclasses.asdict(demo))


__all__ = ["demo_train_config", "run_teacher"]
