"""Generic text the teacher models well (data.generic=teacher): the run's teacher's own samples.

Writes train.jsonl, validation.jsonl and test.jsonl (`{"text", "opening"}` rows, `data.samples` rows per
split) in a folder that the stages reading generic text take as their `generic` input in place of
data.generic (`StageData.with_generic`). Sampling: `pipeline.data.samples.sample_texts`, each split from
its own seed (`data.samples.seed` + 0 / 1 / 2), in fp32.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import HardwareConfig, SamplesConfig
from pipeline.data.samples import sample_rows, sample_texts
from pipeline.stages.common import ConsoleReporter, Reporter, load_model, load_tokenizer, stage, write_meta

SPLITS = ("train", "validation", "test")


@stage("samples", version=1)
@torch.no_grad()
def run_samples(samples: SamplesConfig, hardware: HardwareConfig, *, teacher: str | Path, out_dir: str | Path,
                work_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """`samples.train` / `.validation` / `.test` rows of text sampled from `teacher` (see the module)."""
    reporter = reporter or ConsoleReporter()
    started, out_dir = time.time(), Path(out_dir)
    model = load_model(teacher, hardware, "teacher", fp32=True)
    tokenizer = load_tokenizer(teacher)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, tokens = {}, 0
    for offset, split in enumerate(SPLITS):
        count = getattr(samples, split)
        texts = sample_texts(model, tokenizer, count, max_new_tokens=samples.max_new_tokens,
                             temperature=samples.temperature, batch_size=samples.batch_size,
                             seed=samples.seed + offset)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in sample_rows(texts):
                handle.write(json.dumps(row) + "\n")
        counts[split], tokens = count, tokens + sum(text.new_tokens for text in texts)
        reporter.progress(f"  samples: {count} {split} rows")
    return write_meta(out_dir, "samples", parent="teacher", started=started, checkpoint="teacher-samples",
                      rows=counts, sampled_tokens=tokens)


__all__ = ["SPLITS", "run_samples"]
