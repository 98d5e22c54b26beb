"""Leave-one-out layer importance: drop one layer's mixer (or its whole block), measure the quality drop.

importance = baseline score - score without the layer (accuracy), or NLL without it - baseline NLL.
Low importance = a good layer to give to Mamba first. Only attention layers are scored and ranked: a
teacher that is already a hybrid (a released one) keeps its Mamba layers, which the first conversion
never picks (loo.json lists them as `mamba_layers`). Writes loo.json and loo.png.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline.config import DataConfig, HardwareConfig, LOOConfig
from pipeline.convert import hybridize
from pipeline.data.stage_data import StageData
from pipeline.evaluate.plots import bar_plot
from pipeline.evaluate.quality import answer_accuracy, nll_and_kl
from pipeline.model.config import IDENTITY
from pipeline.model.mixers import IdentityMixer
from pipeline.stages.common import (
    ConsoleReporter,
    Reporter,
    load_model,
    load_tokenizer,
    stage,
    write_meta,
)

LOO_FILE = "loo.json"


class _SkipBlock(nn.Module):
    """A decoder block that returns its input (LOO mode "block": mixer and MLP both gone)."""

    def forward(self, hidden, context):
        return hidden


@contextmanager
def without_layer(model, index: int, mode: str):
    """Temporarily make layer `index` identity; config.layer_types follows, so caches stay consistent."""
    layers = model.model.layers
    saved_block, saved_mixer = layers[index], layers[index].mixer
    saved_types = list(model.config.layer_types)
    model.config.layer_types[index] = IDENTITY
    if mode == "block":
        layers[index] = _SkipBlock()
    else:
        layers[index].mixer = IdentityMixer(model.config, index)
    try:
        yield model
    finally:
        layers[index] = saved_block
        saved_block.mixer = saved_mixer
        model.config.layer_types = saved_types


def score(model, data: StageData, loo: LOOConfig, problems, batches) -> float:
    if loo.metric == "accuracy":
        accuracy, _ = answer_accuracy(model, data.tokenizer, problems, batch_size=loo.batch_size,
                                      max_new_tokens=loo.max_new_tokens)
        return accuracy
    return nll_and_kl(model, batches)["nll"]


def rank_layers(loo: dict) -> list[int]:
    """Attention layers from least to most important (ties: lower index first); a layer the table lists
    in `mamba_layers` is never ranked (an older table of a hybrid teacher scored those too)."""
    mamba = set(loo.get("mamba_layers", []))
    return [entry["layer"] for entry in sorted(loo["layers"], key=lambda e: (e["importance"], e["layer"]))
            if entry["layer"] not in mamba]


def describe_selection(where: str, detail) -> str:
    if where == "held_out":
        return f"the last {detail} train rows of data.distill (held out of distillation)"
    return f"the {detail} split of data.{where}"


@stage("loo", version=4)
@torch.no_grad()
def run_loo(loo: LOOConfig, data: DataConfig, hardware: HardwareConfig, first_count: int, *, teacher: str | Path,
            out_dir: str | Path, work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """Scores the teacher without each layer in turn on validation rows (never the test split).

    data: the eval and distill sources (LOO's rows: `StageData.selection`). first_count: how many layers
    the first conversion takes (marked in the plot)."""
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    model = hybridize(load_model(teacher, hardware, "teacher"), [])  # our class: layers can be switched off
    stage_data = StageData(data, load_tokenizer(teacher))
    where, detail = stage_data.selection()
    rows = stage_data.selection_rows()
    problems = (stage_data.problems(rows, loo.num_examples, ("loo.max_new_tokens", loo.max_new_tokens))
                if loo.metric == "accuracy" else None)
    batches = stage_data.batches(rows, loo.num_examples) if loo.metric == "nll" else None
    scored_on = {"source": where, "split": "train (held out)" if where == "held_out" else detail,
                 "rows": min(loo.num_examples, len(rows))}
    reporter.progress(f"  loo scores {scored_on['rows']} rows of {describe_selection(where, detail)}")
    baseline = score(model, stage_data, loo, problems, batches)
    reporter.progress(f"  loo baseline {loo.metric}: {baseline:.4f}")
    sign = 1.0 if loo.metric == "accuracy" else -1.0  # importance = how much quality drops
    entries = []
    for index in model.config.attention_layers:  # a hybrid teacher's Mamba layers stay Mamba
        with without_layer(model, index, loo.mode):
            value = score(model, stage_data, loo, problems, batches)
        importance = sign * (baseline - value)
        entries.append({"layer": index, "score": value, "importance": importance})
        reporter.log_metrics({"loo/score": value, "loo/importance": importance}, step=index)
        reporter.progress(f"  loo layer {index}: {loo.metric} {value:.4f} (importance {importance:+.4f})")
    result = {"metric": loo.metric, "mode": loo.mode, "scored_on": scored_on, "baseline": baseline,
              "layers": entries}
    mamba = model.config.recurrent_layers  # its converted layers, Mamba or Gated DeltaNet
    if mamba:  # a hybrid teacher (absent otherwise: a plain teacher's table is as it always was)
        result["mamba_layers"] = mamba
    result["ranking"] = rank_layers(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOO_FILE).write_text(json.dumps(result, indent=2) + "\n")
    first = set(result["ranking"][:max(first_count - len(mamba), 0)])
    bar_plot([e["importance"] for e in entries], [str(e["layer"]) for e in entries],
             title=f"leave-one-out importance ({loo.metric}, {loo.mode}); orange = converted first",
             ylabel="quality drop", path=out_dir / "loo.png",
             highlight=[position for position, e in enumerate(entries) if e["layer"] in first])
    for name in (LOO_FILE, "loo.png"):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "loo", parent="teacher", started=started, baseline=baseline, ranking=result["ranking"],
               scored_on=scored_on, **({"mamba_layers": mamba} if mamba else {}))
    return result


__all__ = ["LOO_FILE", "rank_layers", "run_loo", "without_layer"]
