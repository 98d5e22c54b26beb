"""Evaluate the teacher and every checkpoint: answer accuracy, NLL, KL to the teacher (on the reasoning rows and
on generic text), throughput.

Writes summary.json (one record per checkpoint, with its lineage), frontier.png (throughput ratio vs accuracy)
and frontier_tokens.png (accuracy and throughput against cumulative training tokens).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from pipeline.config import DataConfig, EvaluateConfig, HardwareConfig
from pipeline.data.stage_data import StageData
from pipeline.errors import StageError
from pipeline.evaluate.lm_harness import LMEvalError, check_tasks, run_lm_eval
from pipeline.evaluate.plots import frontier_plot, tokens_frontier_plot
from pipeline.evaluate.quality import answer_accuracy, nll_and_kl
from pipeline.evaluate.throughput import generation_throughput
from pipeline.model.config import ATTENTION, GDN, MAMBA, pattern_of
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_precision,
    stage,
    write_meta,
)

SUMMARY_FILE = "summary.json"
TOKENS_FRONTIER_FILE = "frontier_tokens.png"  # accuracy and throughput against cumulative training tokens


def evaluate_checkpoint(evaluate: EvaluateConfig, name: str, model, teacher, data: StageData, problems,
                        batches, precision: str = "fp32", generic_batches=()) -> dict:
    """`precision` (resolved hardware.precision): "bf16-mixed" measures speed on a bf16 copy of `model`.
    `generic_batches`: rows of generic text, scored for NLL and KL beside the reasoning rows."""
    accuracy, samples = answer_accuracy(model, data.tokenizer, problems, batch_size=evaluate.batch_size,
                                        max_new_tokens=evaluate.max_new_tokens)
    reference = None if model is teacher else teacher
    quality = nll_and_kl(model, batches, teacher=reference)
    generic = nll_and_kl(model, generic_batches, teacher=reference) if generic_batches else {}
    # speed as deployed: under bf16-mixed a bf16 copy (the fused decode kernels); quality above in fp32
    fast = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16-mixed" else model
    speed = generation_throughput(fast, batch_size=evaluate.throughput_batch,
                                  prompt_length=evaluate.throughput_prompt,
                                  new_tokens=evaluate.throughput_new_tokens,
                                  repeats=evaluate.throughput_repeats)
    del fast
    config = model.config
    layer_types = list(getattr(config, "layer_types", None) or [ATTENTION] * config.num_hidden_layers)
    extra = {}
    if evaluate.lm_eval.tasks:  # lm-evaluation-harness tasks, same metric names on every checkpoint
        extra["lm_eval"] = run_lm_eval(model, data.tokenizer, evaluate.lm_eval)["scores"]
    if GDN in layer_types:  # only then: a Mamba-only summary is as it always was
        extra["n_gdn"] = layer_types.count(GDN)
    return {
        "checkpoint": name,
        "n_mamba": layer_types.count(MAMBA),
        "layer_types": layer_types,
        "layer_pattern": pattern_of(layer_types, other="I"),
        "answer_accuracy": accuracy,
        "nll": quality["nll"],
        "kl_to_teacher": quality.get("kl_to_teacher", 0.0),
        "nll_generic": generic.get("nll"),
        "kl_generic": generic.get("kl_to_teacher", 0.0) if generic else None,
        "tokens_per_s": speed.tokens_per_s,
        "throughput": speed.to_dict(),
        "examples": len(problems),
        "sample": samples[0]["generated"] if samples else "",
        **extra,
    }


def lineage(folder: str | Path | None) -> dict:
    """Where a checkpoint comes from, from its stage.json, for comparing checkpoints side by side: the
    checkpoint it was trained from, the layers its stage converted and the tokens
    trained on since the teacher (the teacher itself: no parent, nothing converted, 0 tokens)."""
    meta = read_meta(folder) if folder is not None else {}
    return {"parent": meta.get("parent"), "converted_layers": list(meta.get("converted_layers", [])),
            "cumulative_train_tokens": int(meta.get("cumulative_train_tokens", 0))}


# 4: NLL and KL on generic text; 5: answers stop at the end-of-turn token too; 6: throughput prefills the batch
# in forwards of up to 16k tokens (not row by row), and a decode-only ratio
@stage("evaluate", version=6)
@torch.no_grad()
def run_evaluate(evaluate: EvaluateConfig, data: DataConfig, hardware: HardwareConfig, *, teacher: str | Path,
                 checkpoints: dict[str, str | Path], out_dir: str | Path, work_dir: str | Path,
                 generic: str | Path | None = None, reporter: Reporter | None = None) -> list[dict]:
    """`checkpoints`: name -> folder, in the order to report (the teacher is always evaluated first), on
    the test split of data.eval, and for NLL / KL also on `evaluate.nll_examples` rows of the generic text's
    test split (data.generic; `generic`: the teacher's samples folder when data.generic=teacher)."""
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    try:
        check_tasks(evaluate.lm_eval)  # lm-eval installed and every task known, before any model loads
    except LMEvalError as error:
        raise StageError(str(error)) from None
    precision = resolve_precision(hardware)
    teacher_model = load_model(teacher, hardware, "teacher", fp32=True)  # quality in fp32: see resolve_dtype
    stage_data = StageData(data, load_tokenizer(teacher)).with_generic(generic)
    problems = stage_data.eval_problems(evaluate.num_examples, ("evaluate.max_new_tokens", evaluate.max_new_tokens))
    batches = stage_data.eval_batches(evaluate.nll_examples)
    generic_batches = (stage_data.batches(stage_data.rows("generic", "test"), evaluate.nll_examples)
                       if evaluate.generic_nll else ())
    records = [evaluate_checkpoint(evaluate, "teacher", teacher_model, teacher_model, stage_data, problems, batches,
                                   precision, generic_batches)]
    records[0].update(lineage(None))
    reporter.progress(f"  teacher: accuracy {records[0]['answer_accuracy']:.3f}, {records[0]['tokens_per_s']:,.0f} tok/s")
    for name, folder in checkpoints.items():
        model = load_model(folder, hardware, f"checkpoint {name}", fp32=True)
        record = evaluate_checkpoint(evaluate, name, model, teacher_model, stage_data, problems, batches, precision,
                                     generic_batches)
        record.update(lineage(folder))
        records.append(record)
        del model
        reporter.progress(
            f"  {name}: accuracy {record['answer_accuracy']:.3f}, KL {record['kl_to_teacher']:.4f}, "
            f"{record['tokens_per_s']:,.0f} tok/s"
        )
    base = records[0]["tokens_per_s"]
    decode_base = records[0]["throughput"]["decode_tokens_per_s"]
    for record in records:
        record["throughput_ratio"] = record["tokens_per_s"] / base  # prefill + decode, the whole call
        record["decode_ratio"] = record["throughput"]["decode_tokens_per_s"] / decode_base
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(records, indent=2) + "\n")
    frontier_plot(records, out_dir / "frontier.png")
    tokens_frontier_plot(records, out_dir / TOKENS_FRONTIER_FILE)
    for name in (SUMMARY_FILE, "frontier.png", TOKENS_FRONTIER_FILE):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "evaluate", parent=None, started=started, checkpoints=list(checkpoints))
    return records


def summary_table(records: list[dict]) -> str:
    """A markdown table of the summary (README, logs, Prefect artifacts)."""
    gdn = any(r.get("n_gdn") for r in records)  # then the pattern says which layer holds which mixer
    lines = [f"| checkpoint | {'pattern' if gdn else 'Mamba layers'} | accuracy | NLL | KL to teacher | generic NLL | "
             "generic KL | tokens/s | ratio | decode ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        generic = (f"{r['nll_generic']:.4f} | {r['kl_generic']:.4f}" if r.get("nll_generic") is not None
                   else "- | -")
        lines.append(f"| {r['checkpoint']} | {r['layer_pattern'] if gdn else r['n_mamba']} | {r['answer_accuracy']:.3f} | "
                     f"{r['nll']:.4f} | {r['kl_to_teacher']:.4f} | {generic} | {r['tokens_per_s']:,.0f} | "
                     f"{r['throughput_ratio']:.2f} | {_ratio(r.get('decode_ratio'))} |")
    return "\n".join(lines)


def _ratio(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"  # summaries before stage version 6 lack it


__all__ = ["SUMMARY_FILE", "TOKENS_FRONTIER_FILE", "evaluate_checkpoint", "lineage", "run_evaluate", "summary_table"]
