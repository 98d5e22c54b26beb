"""Leave-one-out layer importance: drop one layer's mixer (or its whole block), measure the quality drop.

importance = baseline score - score without the layer (accuracy), or NLL without it - baseline NLL.
Low importance = a good layer to give to Mamba first. Writes loo.json and loo.png.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.convert import hybridize
from pipeline.evaluate.plots import bar_plot
from pipeline.evaluate.quality import answer_accuracy, nll_and_kl
from pipeline.model.config import IDENTITY
from pipeline.model.mixers import IdentityMixer
from pipeline.stages.common import ConsoleReporter, Reporter, StageData, load_model, load_tokenizer, write_meta

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


def score(model, data: StageData, cfg: RunConfig, problems, batches) -> float:
    if cfg.loo.metric == "accuracy":
        accuracy, _ = answer_accuracy(model, data.tokenizer, problems, batch_size=cfg.loo.batch_size,
                                      max_new_tokens=cfg.evaluate.max_new_tokens)
        return accuracy
    return nll_and_kl(model, batches)["nll"]


def rank_layers(loo: dict) -> list[int]:
    """Layers from least to most important (ties: lower index first)."""
    return [entry["layer"] for entry in sorted(loo["layers"], key=lambda e: (e["importance"], e["layer"]))]


@torch.no_grad()
def run_loo(cfg: RunConfig, teacher_dir: str | Path, out_dir: str | Path, *,
            reporter: Reporter | None = None) -> dict:
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    teacher = load_model(teacher_dir, cfg, "teacher")
    model = hybridize(teacher, [])  # the teacher as an all-attention hybrid: layers can be switched off
    del teacher
    data = StageData(cfg, load_tokenizer(teacher_dir))
    problems = data.eval_problems(cfg.loo.num_examples) if cfg.loo.metric == "accuracy" else None
    batches = data.eval_batches(cfg.loo.num_examples) if cfg.loo.metric == "nll" else None
    baseline = score(model, data, cfg, problems, batches)
    reporter.progress(f"  loo baseline {cfg.loo.metric}: {baseline:.4f}")
    sign = 1.0 if cfg.loo.metric == "accuracy" else -1.0  # importance = how much quality drops
    entries = []
    for index in range(model.config.num_hidden_layers):
        with without_layer(model, index, cfg.loo.mode):
            value = score(model, data, cfg, problems, batches)
        importance = sign * (baseline - value)
        entries.append({"layer": index, "score": value, "importance": importance})
        reporter.log_metrics({"loo/score": value, "loo/importance": importance}, step=index)
        reporter.progress(f"  loo layer {index}: {cfg.loo.metric} {value:.4f} (importance {importance:+.4f})")
    result = {"metric": cfg.loo.metric, "mode": cfg.loo.mode, "baseline": baseline, "layers": entries}
    result["ranking"] = rank_layers(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOO_FILE).write_text(json.dumps(result, indent=2) + "\n")
    first = set(result["ranking"][: cfg.schedule.counts[0]])
    bar_plot([e["importance"] for e in entries], [str(e["layer"]) for e in entries],
             title=f"leave-one-out importance ({cfg.loo.metric}, {cfg.loo.mode}); orange = converted first",
             ylabel="quality drop", path=out_dir / "loo.png", highlight=sorted(first))
    for name in (LOO_FILE, "loo.png"):
        reporter.log_artifact(out_dir / name)
    write_meta(out_dir, "loo", cfg, parent=str(teacher_dir), started=started, baseline=baseline,
               ranking=result["ranking"])
    return result


__all__ = ["LOO_FILE", "rank_layers", "run_loo", "without_layer"]
