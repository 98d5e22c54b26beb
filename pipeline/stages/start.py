"""Register the start checkpoint: a hybrid (released or ours) to continue the progressive conversion from.

`start.path` names a hybrid checkpoint in our, the Apriel-H1 or the MambaInLlama layout. It is loaded as a
`HybridForCausalLM`, checked against the teacher it will be distilled from (same hidden size, number of
layers and vocabulary; at least one Mamba layer) and saved in our layout with its tokenizer (the
teacher's if it has none). The chain then runs MMR and the steps from it instead of LOO and the first
conversion; the evaluation reports it as `start`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import HardwareConfig
from pipeline.errors import StageError
from pipeline.model.checkpoint import TOKENIZER_FILES
from pipeline.stages.common import (
    load_model,
    load_tokenizer,
    save_checkpoint,
    stage,
    write_meta,
)

START = "start"  # the start checkpoint's output name (and its name in summary.json)
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")


def shape_mismatches(start: dict, teacher: dict) -> list[str]:
    """`field start-value vs teacher-value` for each of SHAPE_FIELDS the two config.json bodies disagree on
    (a field one of them lacks is not compared)."""
    return [f"{name} {start[name]} vs the teacher's {teacher[name]}" for name in SHAPE_FIELDS
            if start.get(name) is not None and teacher.get(name) is not None and start[name] != teacher[name]]


@stage("start", version=1)
def import_start(hardware: HardwareConfig, *, source: str | Path, teacher: str | Path, out_dir: str | Path,
                 work_dir: str | Path, reporter=None) -> dict:
    """`source`: the start checkpoint's folder; `teacher`: the registered teacher (its shapes must match)."""
    from pipeline.model import HybridForCausalLM
    from pipeline.model.layouts import detect_layout

    started, source, out_dir = time.time(), Path(source), Path(out_dir)
    layout = detect_layout(source) if (source / "config.json").is_file() else None
    model = load_model(source, hardware, "start checkpoint")
    if not isinstance(model, HybridForCausalLM) or not model.config.recurrent_layers:
        raise StageError(f"start checkpoint at {source} is not a hybrid (no Mamba layer): start.path continues "
                         "a hybrid's conversion; a plain transformer is a teacher (teacher.path)")
    start_shape = model.config.to_dict()
    teacher_shape = json.loads((Path(teacher) / "config.json").read_text())
    mismatched = shape_mismatches(start_shape, teacher_shape)
    if mismatched:
        raise StageError(f"start checkpoint at {source} does not fit the teacher: {'; '.join(mismatched)}")
    has_tokenizer = any((source / name).is_file() for name in TOKENIZER_FILES)
    save_checkpoint(model, load_tokenizer(source if has_tokenizer else teacher), out_dir)
    config = model.config
    return write_meta(out_dir, "start", parent=None, started=started, checkpoint=START,
                      source="start.path", layout=layout, n_mamba=len(config.mamba_layers),
                      **({"n_gdn": len(config.gdn_layers)} if config.gdn_layers else {}),
                      layer_types=config.layer_types, layer_pattern=config.layer_pattern,
                      tokenizer="its own" if has_tokenizer else "the teacher's", cumulative_train_tokens=0)


__all__ = ["START", "SHAPE_FIELDS", "import_start", "shape_mismatches"]
