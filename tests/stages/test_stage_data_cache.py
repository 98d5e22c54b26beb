"""Tokenised data is shared across the stages of one process, keyed by what determines it."""

import dataclasses

from pipeline.data import build_char_tokenizer
from pipeline.stages.common import StageData

from tests.stages.conftest import tiny_config


def test_tokenised_rows_are_shared_across_stage_data_objects(tmp_path):
    cfg = tiny_config()
    tokenizer = build_char_tokenizer()
    first = StageData(cfg, tokenizer).tokenized("distill")
    assert StageData(cfg, build_char_tokenizer()).tokenized("distill") is first  # a later stage: no re-tokenising
    shorter = tiny_config()
    shorter.data.max_length = 48
    assert StageData(shorter, tokenizer).tokenized("distill") is not first
    other = tiny_config()
    other.data.demo = dataclasses.replace(other.data.demo, seed=7)  # (a copy: the conftest's object is shared)
    assert StageData(other, tokenizer).tokenized("distill") is not first


def test_a_changed_local_file_is_tokenised_again(tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    row = {"messages": [{"role": "user", "content": "what is 1+1?"}, {"role": "assistant", "content": "answer: 2"}]}
    path.write_text(json.dumps(row) + "\n")
    cfg = tiny_config()
    cfg.data.distill = str(path)
    tokenizer = build_char_tokenizer()
    first = StageData(cfg, tokenizer).tokenized("distill")
    path.write_text((json.dumps(row) + "\n") * 3)
    second = StageData(cfg, tokenizer).tokenized("distill")
    assert len(first) == 1 and len(second) == 3
