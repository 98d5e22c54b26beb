"""Data: bundled demo data, answer checking, the demo tokenizer, loading/tokenising, batching, and the data
a stage reads (`StageData`: its batches, held-out and evaluation rows, the answer-budget check).

The demo's settings (`DemoDataConfig`, `DemoTeacherConfig`) live in `pipeline.config.demo` and are
re-exported here. `datasets` is imported when rows are loaded, not here, so a job that only tokenises and
batches (the GPU benchmarks) runs without it.
"""

from __future__ import annotations

from .answers import extract_answer, format_answer, is_correct
from .batching import (
    Batch,
    BatchingError,
    BucketBatchPlan,
    collate,
    iter_batches,
    prompt_batch,
    prompt_messages,
)
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
from .loading import DataLoadError, load_rows, load_tokenized, stop_token_ids, tokenize_row, tokenize_rows
from .stage_data import (
    MAX_CUT_SHARE,
    MIX,
    MIX_PARTS,
    VALIDATION_SPLIT,
    StageData,
    check_answer_budget,
    distillation_source,
    held_out_count,
    padding_id,
    reference_reply,
    tokenizer_digest,
)
from .tokenizer import CHAT_TEMPLATE, TokenizerError, build_char_tokenizer, load_tokenizer

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
    # tokenizer
    "CHAT_TEMPLATE",
    "TokenizerError",
    "build_char_tokenizer",
    "load_tokenizer",
    # loading
    "DataLoadError",
    "load_rows",
    "stop_token_ids",
    "tokenize_row",
    "tokenize_rows",
    "load_tokenized",
    # batching
    "Batch",
    "BatchingError",
    "BucketBatchPlan",
    "collate",
    "iter_batches",
    "prompt_messages",
    "prompt_batch",
    # stage_data
    "MAX_CUT_SHARE",
    "MIX",
    "MIX_PARTS",
    "VALIDATION_SPLIT",
    "StageData",
    "check_answer_budget",
    "distillation_source",
    "held_out_count",
    "padding_id",
    "reference_reply",
    "tokenizer_digest",
]
