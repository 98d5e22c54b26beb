import json

import datasets
import pytest

from pipeline.data.loading import DataLoadError, load_rows, load_tokenized, tokenize_row, tokenize_rows
from pipeline.data.tokenizer import build_char_tokenizer

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "what is 1+1?"},
        {"role": "assistant", "content": "1+1=2\nanswer: 2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "answer: 4"},
    ]
}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_mask_covers_exactly_assistant_tokens(tokenizer, small_demo):
    for row in small_demo.reasoning["train"][:50] + [MULTI_TURN]:
        ids, mask = tokenize_row(row, tokenizer)
        assert len(ids) == len(mask)
        # masked tokens, read back, are the assistant contents each followed by eos, in order
        spans, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(i)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        expected = [m["content"] + "</s>" for m in row["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(s) for s in spans] == expected
        # unmasked tokens are exactly the prompt parts
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert tokenizer.decode(ids) == full


def test_text_rows_have_loss_on_all_tokens(tokenizer):
    ids, mask = tokenize_row({"text": "a cat."}, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]) == "a cat."
    assert mask == [1] * len(ids)


def test_load_jsonl_folder_parquet_and_memory(tokenizer, small_demo, tmp_path):
    rows = small_demo.reasoning["train"][:20]
    f = _write_jsonl(tmp_path / "one.jsonl", rows)
    assert len(load_rows(f)) == 20
    assert len(load_rows(str(f))) == 20
    assert len(load_rows([f, f])) == 40
    folder = tmp_path / "folder"
    _write_jsonl(folder / "train.jsonl", rows)
    _write_jsonl(folder / "validation.jsonl", small_demo.reasoning["validation"][:7])
    assert len(load_rows(folder)) == 20
    assert len(load_rows(folder, split="validation")) == 7
    pq = tmp_path / "t.parquet"
    datasets.Dataset.from_list(small_demo.text["train"][:9]).to_parquet(str(pq))
    assert len(load_rows(pq)) == 9
    assert len(load_rows(small_demo.text["train"][:5])) == 5
    ds = datasets.Dataset.from_list(rows)
    assert load_rows(ds) is ds
    assert len(load_rows(datasets.DatasetDict({"train": ds}))) == 20


def test_mixed_file_tokenizes_both_kinds(tokenizer, small_demo, tmp_path):
    rows = small_demo.reasoning["train"][:5] + small_demo.text["train"][:5]
    f = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    tok = load_tokenized(f, tokenizer, max_length=512)
    assert len(tok) == 10 and tok.column_names == ["input_ids", "loss_mask", "length", "source_index"]
    for k, row in enumerate(tok):
        assert row["length"] == len(row["input_ids"]) == len(row["loss_mask"])
        assert row["source_index"] == k
        if k >= 5:  # text rows
            assert all(row["loss_mask"])
        else:
            assert 0 < sum(row["loss_mask"]) < row["length"]


def test_truncation_and_drop(tokenizer, small_demo):
    rows = small_demo.reasoning["train"][:10] + small_demo.text["train"][:10]
    ds = load_rows(rows)
    full = tokenize_rows(ds, tokenizer, max_length=512)
    lengths = full["length"]
    cut = 40
    short = tokenize_rows(ds, tokenizer, max_length=cut)
    assert max(short["length"]) <= cut
    for row in short:  # truncation keeps the first tokens
        assert row["input_ids"] == full[row["source_index"]]["input_ids"][:cut]
    dropped = tokenize_rows(ds, tokenizer, max_length=cut, overflow="drop")
    assert sorted(dropped["source_index"]) == [i for i, n in enumerate(lengths) if n <= cut]
    # chat rows whose answer is cut away entirely are dropped (no loss tokens)
    tiny = tokenize_rows(ds, tokenizer, max_length=12)
    assert all(any(m) for m in tiny["loss_mask"])
    assert set(tiny["source_index"]) == set(range(10, 20))


def test_error_empty(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataLoadError, match="empty"):
        load_rows(empty)
    with pytest.raises(DataLoadError, match="empty"):
        load_rows([])
    with pytest.raises(DataLoadError, match="empty"):
        load_rows(datasets.Dataset.from_list([]))


def test_error_row_without_messages_or_text(tokenizer, small_demo, tmp_path):
    rows = small_demo.reasoning["train"][:3] + [{"prompt": "x", "completion": "y"}]
    f = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataLoadError, match=r"row 3 has neither 'messages' nor 'text' \(keys: \['completion', 'prompt'\]\)"):
        load_tokenized(f, tokenizer, max_length=128)
    with pytest.raises(DataLoadError, match=r"row 0 has neither .*keys: \['prompt'\]"):
        tokenize_rows(datasets.Dataset.from_list([{"prompt": "x"}]), tokenizer, max_length=128)


def test_error_chat_rows_without_chat_template(small_demo):
    tok = build_char_tokenizer()
    tok.chat_template = None
    ds = load_rows(small_demo.text["train"][:2] + small_demo.reasoning["train"][:2])
    with pytest.raises(DataLoadError, match="row 2 is a chat row .* no chat template"):
        tokenize_rows(ds, tok, max_length=128)
    # plain text still works without a template
    assert len(tokenize_rows(datasets.Dataset.from_list(small_demo.text["train"][:2]), tok, max_length=128)) == 2


def test_template_without_generation_markers_gets_masks_turn_by_turn(small_demo):
    """No markers and no end-of-turn token: the mask is the assistant content (tests/data/test_chat_masks.py
    has the released templates); markers that mark nothing are refused."""
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    row = small_demo.reasoning["train"][0]
    ids, mask = tokenize_row(row, tok, 0)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == row["messages"][1]["content"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% generation %}{% endgeneration %}{% endfor %}"
    with pytest.raises(DataLoadError, match=r"row 4: the chat template's \{% generation %\} markers mark no assistant"):
        tokenize_row(row, tok, 4)


def test_error_missing_path_and_split(tmp_path, small_demo):
    with pytest.raises(DataLoadError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataLoadError, match="does not exist"):
        load_rows(str(tmp_path / "nope"))
    with pytest.raises(DataLoadError, match="does not exist"):
        load_rows("./no/such/file.jsonl")
    with pytest.raises(DataLoadError, match="does not exist"):
        load_rows([tmp_path / "nope.jsonl"])
    _write_jsonl(tmp_path / "d" / "train.jsonl", small_demo.text["train"][:3])
    with pytest.raises(DataLoadError, match="split 'test' not found.*train"):
        load_rows(tmp_path / "d", split="test")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataLoadError, match="unsupported data file"):
        load_rows(tmp_path / "x.csv")


def test_error_hub_name_offline_is_one_line():
    with pytest.raises(DataLoadError, match="could not load dataset 'someorg/missing-set'") as info:
        load_rows("someorg/missing-set")
    assert "\n" not in str(info.value)


def test_error_bad_arguments(tokenizer, small_demo):
    ds = datasets.Dataset.from_list(small_demo.text["train"][:2])
    with pytest.raises(DataLoadError, match="max_length"):
        tokenize_rows(ds, tokenizer, max_length=1)
    with pytest.raises(DataLoadError, match="overflow"):
        tokenize_rows(ds, tokenizer, max_length=64, overflow="wrap")  # type: ignore[arg-type]
    with pytest.raises(DataLoadError, match="no rows left"):
        tokenize_rows(datasets.Dataset.from_list(small_demo.text["train"][:2]), tokenizer, max_length=2,
                      overflow="drop")
    with pytest.raises(DataLoadError, match="row 0: 'messages' must be"):
        tokenize_row({"messages": "hi"}, tokenizer, 0)


def test_written_demo_folders_load_by_split(tokenizer, tmp_path):
    from pipeline.data.demo import write_demo_data

    write_demo_data(tmp_path, seed=2, n_train=40, n_validation=10, n_test=12, n_text_train=30,
                    n_text_validation=5, n_text_test=5)
    test = load_rows(tmp_path / "reasoning", split="test")
    assert len(test) == 12 and set(test.column_names) == {"messages", "answer"}
    tok = load_tokenized(tmp_path / "reasoning", tokenizer, max_length=128, split="validation")
    assert len(tok) == 10
    text = load_tokenized(tmp_path / "text", tokenizer, max_length=128)
    assert len(text) == 30 and all(all(m) for m in text["loss_mask"])


def test_error_malformed_json_lines_names_the_parse_error(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "x"\n')
    with pytest.raises(DataLoadError, match=r"could not read .*broken.jsonl.*JSON parse error") as info:
        load_rows(bad)
    assert "\n" not in str(info.value)


def test_a_stored_output_given_as_data_reads_as_its_split_files_alone(tmp_path):
    """A stage output used as data (the teacher's samples, data.generic=teacher) holds the store's and the
    stage's record files beside its rows: its train split is train.jsonl, not those."""
    folder = tmp_path / "teacher-samples"
    _write_jsonl(folder / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    _write_jsonl(folder / "test.jsonl", [{"text": "c"}])
    for name in ("manifest.json", "stage.json", "run_config.json"):
        (folder / name).write_text(json.dumps({"files": [], "stage": "samples"}))
    assert load_rows(str(folder), "train")["text"] == ["a", "b"]
    assert load_rows(str(folder), "test")["text"] == ["c"]
    _write_jsonl(folder / "more" / "stage.json", [{"text": "d"}])  # only the top folder's records are left out
    assert sorted(load_rows(str(folder), "train")["text"]) == ["a", "b", "d"]
