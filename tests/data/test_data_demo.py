import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.answers import extract_answer, is_correct
from pipeline.data.demo import (
    SPLITS,
    DemoDataConfig,
    DemoDataError,
    DemoTeacherConfig,
    generate_demo_data,
    make_problem,
    write_demo_data,
)

SMALL = dict(n_train=300, n_validation=50, n_test=50, n_text_train=200, n_text_validation=30, n_text_test=30)


def _read_all(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    write_demo_data(tmp_path / "a", seed=5, **SMALL)
    write_demo_data(tmp_path / "b", seed=5, **SMALL)
    a, b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    assert set(a) == {"demo_config.json"} | {f"{k}/{s}.jsonl" for k in ("reasoning", "text") for s in SPLITS}
    assert a == b
    write_demo_data(tmp_path / "c", seed=6, **SMALL)
    c = _read_all(tmp_path / "c")
    assert c["reasoning/train.jsonl"] != a["reasoning/train.jsonl"]
    assert c["text/train.jsonl"] != a["text/train.jsonl"]


def test_files_match_in_memory_data(tmp_path):
    data = generate_demo_data(seed=5, **SMALL)
    write_demo_data(tmp_path, seed=5, **SMALL)
    for rel, rows in data.iter_files():
        lines = (tmp_path / rel).read_text().splitlines()
        assert [json.loads(x) for x in lines] == rows
    assert json.loads((tmp_path / "demo_config.json").read_text()) == data.config.to_dict()


def test_split_sizes_and_disjointness(small_demo):
    cfg = small_demo.config
    sizes = {s: len(small_demo.reasoning[s]) for s in SPLITS}
    assert sizes == {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
    for kind, key in (("reasoning", lambda r: r["messages"][0]["content"]), ("text", lambda r: r["text"])):
        sets = {s: {key(r) for r in getattr(small_demo, kind)[s]} for s in SPLITS}
        for s in SPLITS:  # no duplicates inside a split either
            assert len(sets[s]) == len(getattr(small_demo, kind)[s])
        assert not sets["train"] & sets["validation"]
        assert not sets["train"] & sets["test"]
        assert not sets["validation"] & sets["test"]


def test_test_split_does_not_depend_on_train_size():
    a = generate_demo_data(seed=1, **SMALL)
    b = generate_demo_data(seed=1, **{**SMALL, "n_train": 900})
    assert a.reasoning["test"] == b.reasoning["test"]
    assert a.reasoning["validation"] == b.reasoning["validation"]


def test_every_trace_is_correct_and_checkable(small_demo):
    cfg = small_demo.config
    for split in SPLITS:
        for row in small_demo.reasoning[split]:
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            expr = re.fullmatch(r"what is ([0-9+\-]+)\?", user["content"]).group(1)
            assert str(eval(expr)) == row["answer"]  # the chain's true value
            n_ops = len(re.findall(r"[+-]", expr))
            assert cfg.min_ops <= n_ops <= cfg.max_ops
            *steps, last = assistant["content"].split("\n")
            assert len(steps) == n_ops
            for line in steps:  # each written step is right and stays in range
                lhs, rhs = line.split("=")
                assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= cfg.max_value
            assert extract_answer(assistant["content"]) == row["answer"]
            assert is_correct(assistant["content"], row["answer"])
            corrupted = str(int(row["answer"]) + 1)
            assert not is_correct(assistant["content"], corrupted)
            assert not is_correct(assistant["content"].replace(f"answer: {row['answer']}", f"answer: {corrupted}"),
                                  row["answer"])


def test_text_corpus_covers_trace_characters(small_demo):
    trace_chars = {c for r in small_demo.reasoning["train"] for m in r["messages"] for c in m["content"]}
    text_chars = {c for r in small_demo.text["train"] for c in r["text"]}
    assert trace_chars <= text_chars, sorted(trace_chars - text_chars)
    assert all(set(r) == {"text"} for r in small_demo.text["train"])
    # generic text holds no reasoning chains
    assert not any(re.search(r"\d[+-]\d=\d", r["text"]) for r in small_demo.text["train"])


def test_make_problem():
    row = make_problem(3, [("+", 5), ("-", 2)])
    assert row["messages"][0]["content"] == "what is 3+5-2?"
    assert row["messages"][1]["content"] == "3+5=8\n8-2=6\nanswer: 6"
    assert row["answer"] == "6"
    with pytest.raises(DemoDataError, match="unknown operator"):
        make_problem(3, [("*", 2)])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(min_ops=3, max_ops=2), "min_ops"),
        (dict(n_train=-1), "n_train"),
        (dict(max_value=0), "max_value"),
        (dict(min_operand=5, max_operand=2), "min_operand"),
        (dict(bogus=1), "unknown DemoDataConfig field"),
        (dict(min_ops=1, max_ops=1, max_value=2, max_operand=2, n_train=100), "unique reasoning rows"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, match):
    with pytest.raises(DemoDataError, match=match):
        generate_demo_data(**{**SMALL, **overrides})


def test_write_into_a_file_path_is_an_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DemoDataError, match="not a directory"):
        write_demo_data(f, **SMALL)


def test_demo_teacher_config_builds_a_llama_config(tokenizer):
    from transformers import LlamaConfig

    cfg = DemoTeacherConfig()
    assert cfg.num_hidden_layers >= 6
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.num_key_value_heads < cfg.num_attention_heads
    kwargs = cfg.llama_config_kwargs(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    llama = LlamaConfig(**kwargs)
    assert llama.num_hidden_layers == cfg.num_hidden_layers and llama.vocab_size == len(tokenizer)
    train = cfg.train  # the calibrated schedule, in the TrainConfig every stage takes
    assert (train.steps, train.lr, train.warmup_steps, train.batch_size, train.loss) == (1200, 3e-3, 100, 32, "ce")
    assert dataclasses.asdict(cfg)["train"]["min_lr_ratio"] == 0.1


def test_config_modules_import_no_torch():
    code = (
        "import sys; import pipeline; base = 'torch' in sys.modules; "
        "import pipeline.config, pipeline.config.demo, pipeline.config.train; "
        "print(base, any(name in sys.modules for name in ('torch', 'transformers', 'pipeline.data', 'pipeline.train')))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    base, heavy = out.stdout.split()
    if base == "True":
        pytest.skip("the top-level pipeline package already imports torch")
    assert heavy == "False"
