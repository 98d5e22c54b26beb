"""lm-evaluation-harness in the evaluate stage, on CPU: a task in lm-eval's own YAML format over the demo's
held-out problems must score each checkpoint exactly as the stage's own answer accuracy does.

Needs the `lm-eval` extra (`make test` and `.ci/run` install it); skipped where it is missing unless
`HYBRID_REQUIRE_LM_EVAL=1` (CI) makes its absence a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from pipeline.config import EvaluateConfig, LMEvalConfig
from pipeline.stages import StageError, run_evaluate

from tests.stages.conftest import RecordingReporter, tiny_config

TASK = "demo_arithmetic"
METRIC = "exact_match/final-answer"
# lm-eval's task format: the problems from a jsonl file, greedy generation to the end-of-sequence token,
# the last "answer: N" extracted by a regex filter, exact match against the reference answer.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
filter_list:
  - name: final-answer
    filter:
      - function: regex
        regex_pattern: "answer\\\\s*:\\\\s*([+-]?\\\\d+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _require_lm_eval():
    if os.environ.get("HYBRID_REQUIRE_LM_EVAL") == "1":
        import lm_eval  # noqa: F401  (CI: its absence is a failure, not a skip)
    else:
        pytest.importorskip("lm_eval")


def _evaluate_config(task_dir, problems: int = 16) -> EvaluateConfig:
    return EvaluateConfig(num_examples=problems, batch_size=problems, max_new_tokens=48, nll_examples=8,
                          throughput_batch=2, throughput_prompt=8, throughput_new_tokens=4, throughput_repeats=1,
                          lm_eval=LMEvalConfig(tasks=[TASK], include_path=str(task_dir), apply_chat_template=True,
                                               batch_size=problems))


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny Llama that has learnt 10 of the 16 held-out problems by heart (so some answers are right and
    some wrong), a one-Mamba-layer hybrid of it, and the task folder over those 16 problems."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.convert import hybridize
    from pipeline.data import build_char_tokenizer
    from pipeline.stages.common import StageData

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = build_char_tokenizer()
    cfg = tiny_config(evaluate=_evaluate_config(root / "tasks"))
    problems = StageData(cfg.data, tokenizer).eval_problems(cfg.evaluate.num_examples)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in problems[:10]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        loss = model(**batch, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    hybridize(model, [1]).save_pretrained(root / "H-1")
    (root / "tasks").mkdir()
    with open(root / "tasks" / "problems.jsonl", "w") as handle:
        for row in problems:
            handle.write(json.dumps({"question": row["messages"][0]["content"], "answer": row["answer"]}) + "\n")
    (root / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(
        task=TASK, data=root / "tasks" / "problems.jsonl", max_new_tokens=cfg.evaluate.max_new_tokens))
    return cfg, root


def test_lm_eval_exact_match_agrees_with_the_stage_accuracy(memorised, tmp_path):
    _require_lm_eval()
    cfg, root = memorised
    records = run_evaluate(cfg.evaluate, cfg.data, cfg.hardware, teacher=root / "teacher",
                           checkpoints={"H-1": root / "H-1"}, out_dir=tmp_path / "evaluate",
                           work_dir=tmp_path / "work", reporter=RecordingReporter())
    teacher = records[0]
    assert 0 < teacher["answer_accuracy"] < 1, teacher["answer_accuracy"]  # the comparison is not trivial
    for record in records:
        assert record["lm_eval"][TASK][METRIC] == pytest.approx(record["answer_accuracy"], abs=1e-9), record["checkpoint"]
    summary = json.loads((tmp_path / "evaluate" / "summary.json").read_text())
    assert [r["lm_eval"] for r in summary] == [r["lm_eval"] for r in records]

    # The same metric names on every checkpoint, for MLflow's compare view.
    from flows.publish import summary_metrics

    names = [sorted(k for k in summary_metrics(record) if k.startswith("lm_eval/")) for record in records]
    assert names[0] == names[1] == [f"lm_eval/{TASK}/{METRIC}"]


def test_lm_eval_agrees_row_by_row(memorised):
    _require_lm_eval()
    from pipeline.data import load_tokenizer
    from pipeline.evaluate.lm_harness import run_lm_eval
    from pipeline.evaluate.quality import answer_accuracy
    from pipeline.model.layouts import load_pretrained
    from pipeline.stages.common import StageData

    cfg, root = memorised
    model, tokenizer = load_pretrained(root / "teacher").eval(), load_tokenizer(root / "teacher")
    problems = StageData(cfg.data, tokenizer).eval_problems(cfg.evaluate.num_examples)
    accuracy, ours = answer_accuracy(model, tokenizer, problems, batch_size=16,
                                     max_new_tokens=cfg.evaluate.max_new_tokens)
    theirs = run_lm_eval(model, tokenizer, cfg.evaluate.lm_eval, samples=True)["samples"][TASK]
    by_question = {sample["doc"]["question"]: sample for sample in theirs}
    assert len(by_question) == len(problems)
    for row, record in zip(problems, ours):
        sample = by_question[row["messages"][0]["content"]]
        assert bool(sample["exact_match"]) == record["correct"], (row, sample["resps"], record["generated"])

    # The command `make lm-eval` runs, on the checkpoint folder.
    from pipeline.evaluate.lm_harness import main

    out = root / "command.json"
    assert main([str(root / "teacher"), "--tasks", TASK, "--include-path", cfg.evaluate.lm_eval.include_path,
                 "--apply-chat-template", "--batch-size", "16", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())[str(root / "teacher")][TASK][METRIC] == pytest.approx(accuracy, abs=1e-9)


def test_missing_lm_eval_or_unknown_task_fails_before_any_model_loads(memorised, tmp_path, monkeypatch):
    cfg, root = memorised
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "lm_eval", None)  # as if not installed
        with pytest.raises(StageError, match=r"needs lm-evaluation-harness, which is not installed: pip install"):
            run_evaluate(cfg.evaluate, cfg.data, cfg.hardware, teacher=tmp_path / "no-teacher", checkpoints={},
                         out_dir=tmp_path / "out", work_dir=tmp_path / "work")
    _require_lm_eval()
    wrong = dataclasses.replace(cfg, evaluate=dataclasses.replace(
        cfg.evaluate, lm_eval=dataclasses.replace(cfg.evaluate.lm_eval, tasks=["no_such_task"])))
    with pytest.raises(StageError, match=r"does not know the task\(s\) \['no_such_task'\]"):
        run_evaluate(wrong.evaluate, wrong.data, wrong.hardware, teacher=tmp_path / "no-teacher", checkpoints={},
                     out_dir=tmp_path / "out", work_dir=tmp_path / "work")
    assert not (tmp_path / "out").exists()


def test_the_flow_checks_lm_eval_before_any_stage_runs(tmp_path, monkeypatch):
    from flows.convert import run_conversion
    from pipeline.config import ConfigError, StorageConfig

    cfg = tiny_config(evaluate=_evaluate_config(tmp_path), storage=StorageConfig(uri=str(tmp_path / "store")))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs lm-evaluation-harness, which is not installed"):
        run_conversion(cfg)
    assert not (tmp_path / "store").exists()  # no stage ran, nothing written
