"""Quality of one checkpoint for the ablation (flows/ablation.py): what it kept of the teacher's reasoning
and of its generic language modelling.

Writes quality.json: answer accuracy on the held-out reasoning problems (test split of data.eval), NLL
per target token on that split and on the generic text test split, KL(student || teacher) per target token
on both, and the distillation tokens the checkpoint was trained on along its whole lineage. No throughput:
the ablation compares what the distillation kept, not speed (the conversion flow's evaluate stage has it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import DataConfig, EvaluateConfig, HardwareConfig
from pipeline.data.stage_data import StageData
from pipeline.evaluate.quality import answer_accuracy, nll_and_kl
from pipeline.model.config import attention_pattern
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_device,
    stage,
    write_meta,
)
from pipeline.stages.evaluate import lineage

QUALITY_FILE = "quality.json"
QUALITY_METRICS = ("answer_accuracy", "nll_reasoning", "nll_generic", "kl_to_teacher", "kl_generic")


def device_name(hardware: HardwareConfig) -> str:
    """The accelerator a stage ran on, as torch names it ("cpu" without one)."""
    device = resolve_device(hardware)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@stage("quality", version=1)
@torch.no_grad()
def run_quality(evaluate: EvaluateConfig, data: DataConfig, hardware: HardwareConfig, *, teacher: str | Path,
                checkpoint: str | Path, out_dir: str | Path, work_dir: str | Path, generic: str | Path | None = None,
                reporter: Reporter | None = None) -> dict:
    """`checkpoint`: a hybrid (or the teacher itself) scored against `teacher` on `evaluate.num_examples`
    problems and `evaluate.nll_examples` rows of each test split; models held in fp32 (as `run_evaluate`).
    `generic`: the teacher's samples folder when data.generic=teacher (an input only then)."""
    reporter = reporter or ConsoleReporter()
    started, out_dir, checkpoint = time.time(), Path(out_dir), Path(checkpoint)
    teacher_model = load_model(teacher, hardware, "teacher", fp32=True)
    is_teacher = checkpoint.resolve() == Path(teacher).resolve()
    model = teacher_model if is_teacher else load_model(checkpoint, hardware, "checkpoint", fp32=True)
    stage_data = StageData(data, load_tokenizer(teacher)).with_generic(generic)
    problems = stage_data.eval_problems(evaluate.num_examples, ("evaluate.max_new_tokens", evaluate.max_new_tokens))
    accuracy, samples = answer_accuracy(model, stage_data.tokenizer, problems, batch_size=evaluate.batch_size,
                                        max_new_tokens=evaluate.max_new_tokens)
    reference = None if is_teacher else teacher_model
    reasoning = nll_and_kl(model, stage_data.eval_batches(evaluate.nll_examples), teacher=reference)
    generic = nll_and_kl(model, stage_data.batches(stage_data.rows("generic", "test"), evaluate.nll_examples),
                         teacher=reference)
    meta = read_meta(checkpoint)
    record = {
        "checkpoint": meta.get("checkpoint") or ("teacher" if is_teacher else checkpoint.name),
        "n_mamba": int(meta.get("n_mamba") or 0),
        "layer_pattern": meta.get("layer_pattern") or attention_pattern(model.config.num_hidden_layers),
        "answer_accuracy": accuracy,
        "nll_reasoning": reasoning["nll"],
        "nll_generic": generic["nll"],
        "kl_to_teacher": reasoning.get("kl_to_teacher", 0.0),
        "kl_generic": generic.get("kl_to_teacher", 0.0),
        "tokens": lineage(None if is_teacher else checkpoint)["cumulative_train_tokens"],
        "examples": len(problems),
        "sample": samples[0]["generated"] if samples else "",
        "device": device_name(hardware),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / QUALITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    reporter.log_metrics({name: float(record[name]) for name in QUALITY_METRICS})
    reporter.log_artifact(out_dir / QUALITY_FILE)
    reporter.progress(f"  {record['checkpoint']}: accuracy {accuracy:.3f}, NLL reasoning "
                      f"{record['nll_reasoning']:.4f}, generic {record['nll_generic']:.4f}, KL {record['kl_to_teacher']:.4f}")
    write_meta(out_dir, "quality", parent=record["checkpoint"], started=started, device=record["device"])
    return record


__all__ = ["QUALITY_FILE", "QUALITY_METRICS", "device_name", "run_quality"]
