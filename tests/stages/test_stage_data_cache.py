"""Tokenised data is shared across the stages of one process, keyed by what determines it."""

import dataclasses

import pytest

from pipeline.data import build_char_tokenizer
from pipeline.stages.common import StageData

from tests.stages.conftest import tiny_config


def test_tokenised_rows_are_shared_across_stage_data_objects(tmp_path):
    cfg = tiny_config()
    tokenizer = build_char_tokenizer()
    first = StageData(cfg.data.view("distill"), tokenizer).tokenized("distill")
    # a later stage with another view of the data section (e.g. LOO's, which also reads data.eval): no re-tokenising
    assert StageData(cfg.data.view("eval", "distill"), build_char_tokenizer()).tokenized("distill") is first
    assert StageData(cfg.data, tokenizer).tokenized("distill") is first
    shorter = dataclasses.replace(cfg.data, max_length=48)
    assert StageData(shorter.view("distill"), tokenizer).tokenized("distill") is not first
    other = dataclasses.replace(cfg.data, demo=dataclasses.replace(cfg.data.demo, seed=7))
    assert StageData(other.view("distill"), tokenizer).tokenized("distill") is not first
    fewer = dataclasses.replace(cfg.data, demo=dataclasses.replace(cfg.data.demo, n_train=cfg.data.demo.n_train - 1))
    assert len(StageData(fewer, tokenizer).tokenized("distill")) == len(first) - 1


def test_a_changed_local_file_is_tokenised_again(tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    row = {"messages": [{"role": "user", "content": "what is 1+1?"}, {"role": "assistant", "content": "answer: 2"}]}
    path.write_text(json.dumps(row) + "\n")
    data = dataclasses.replace(tiny_config().data, distill=str(path))
    tokenizer = build_char_tokenizer()
    first = StageData(data, tokenizer).tokenized("distill")
    path.write_text((json.dumps(row) + "\n") * 50)
    second = StageData(data, tokenizer).tokenized("distill")
    assert len(second) == 49  # a file without a validation split lends its last 2% to LOO (here 1 row)
    assert len(first) == 1
    larger_share = dataclasses.replace(data, validation_share=0.05)  # 2 rows held out: another key
    assert len(StageData(larger_share, tokenizer).tokenized("distill")) == 48


def test_a_hub_source_without_the_split_has_none_but_an_unexpected_error_is_not_swallowed(monkeypatch):
    import pipeline.data
    from pipeline.data import DataLoadError
    from pipeline.stages.common import _has_split

    def no_split(source, split):
        raise DataLoadError(f"could not load dataset {source!r} split {split!r}")

    monkeypatch.setattr(pipeline.data, "load_rows", no_split)
    assert _has_split("someone/some-dataset", "validation") is False  # the documented fallback

    def broken(source, split):
        raise TypeError("a bug in the loader")

    monkeypatch.setattr(pipeline.data, "load_rows", broken)
    with pytest.raises(TypeError, match="a bug in the loader"):
        _has_split("someone/some-dataset", "validation")
