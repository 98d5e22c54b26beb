"""Data: bundled demo data, answer checking, the demo tokenizer, loading/tokenising, batching, and the data
a stage reads (`StageData`: its batches, held-out and evaluation rows, the answer-budget check).

``demo`` and ``answers`` import no torch/transformers; the other modules load lazily on first use, so
``from pipeline.data import DemoTeacherConfig`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .answers import extract_answer, format_answer, is_correct
from .demo import (
    SPLITS,
    DemoData,
    DemoDataConfig,
    DemoDataError,
    DemoTeacherConfig,
    generate_demo_data,
    make_problem,
    write_demo_data,
)

_LAZY: dict[str, str] = {
    # tokenizer
    "CHAT_TEMPLATE": "tokenizer",
    "TokenizerError": "tokenizer",
    "build_char_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    # loading
    "DataLoadError": "loading",
    "load_rows": "loading",
    "stop_token_ids": "loading",
    "tokenize_row": "loading",
    "tokenize_rows": "loading",
    "load_tokenized": "loading",
    # batching
    "Batch": "batching",
    "BatchingError": "batching",
    "BucketBatchPlan": "batching",
    "collate": "batching",
    "iter_batches": "batching",
    "prompt_messages": "batching",
    "prompt_batch": "batching",
    # stage_data
    "MAX_CUT_SHARE": "stage_data",
    "MIX": "stage_data",
    "MIX_PARTS": "stage_data",
    "VALIDATION_SPLIT": "stage_data",
    "StageData": "stage_data",
    "check_answer_budget": "stage_data",
    "distill_kind": "stage_data",
    "held_out_count": "stage_data",
    "padding_id": "stage_data",
    "reference_reply": "stage_data",
    "tokenizer_digest": "stage_data",
}

__all__ = [
    "SPLITS",
    "DemoData",
    "DemoDataConfig",
    "DemoDataError",
    "DemoTeacherConfig",
    "generate_demo_data",
    "make_problem",
    "write_demo_data",
    "extract_answer",
    "format_answer",
    "is_correct",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import tokenizer/loading/batching/stage_data members on first access (they pull in torch/transformers)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
