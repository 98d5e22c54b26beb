"""The plan checks the first rows of every data source the run reads against the teacher's tokenizer and
chat template: each problem one line, all at once, in seconds, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import compose
from flows.convert import check_run
from pipeline.plan import ROWS_CHECKED
from tests.teachers import save_tiny_teacher

# Closes a turn with eos only when another message follows: the prompt of a reply ("<|user|>q<|assistant|>")
# is not the start of the conversation through it ("<|user|>q</s><|assistant|>..."); no {% generation %}
NO_PREFIX_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                      "{% if not loop.last %}{{ eos_token }}{% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def overrides(tmp_path: Path, *more: str) -> list[str]:
    return ["experiment=tiny", f"storage.uri={tmp_path / 'artifacts'}", f"storage.cache_dir={tmp_path / 'cache'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *more]


def checked(tmp_path: Path, *more: str):
    before = sorted(path.name for path in tmp_path.iterdir())
    plan = check_run(compose(overrides(tmp_path, *more)))
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # nothing written
    assert all("\n" not in line for line in plan.problems + plan.notes)
    return plan


def chat(question: str, reply: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], **extra}


def write_rows(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) and row.startswith("{") else json.dumps(row)) + "\n"
                            for row in rows))
    return path


@pytest.fixture(scope="module")
def teacher_without_prefix_property(tmp_path_factory) -> Path:
    from pipeline.data import load_tokenizer

    folder = save_tiny_teacher(tmp_path_factory.mktemp("teacher"))
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = NO_PREFIX_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_the_demo_run_states_the_data_facts(tmp_path):
    plan = checked(tmp_path)
    assert plan.problems == []
    assert [note for note in plan.notes if note.startswith("data rows")] == [
        f"data rows checked with the teacher's tokenizer (the first {ROWS_CHECKED} of each split; assistant tokens "
        "from its {% generation %} markers; data.max_length=96): the bundled demo reasoning traces (data.distill, "
        "data.eval, data.sft unset) train/validation/test: 24 rows, 40-62 tokens; the bundled demo text corpus "
        "(data.generic unset) test: 8 rows, 35-124 tokens"]  # the evaluation's generic NLL reads it


def test_a_teacher_template_without_the_prefix_property_is_one_line(tmp_path, teacher_without_prefix_property):
    folder = teacher_without_prefix_property
    plan = checked(tmp_path, "teacher=local", f"teacher.path={folder}")
    assert plan.problems == [
        "the bundled demo reasoning traces (data.eval, data.distill, data.sft unset) validation split: row 0: message 1 "
        "(assistant): the chat template's generation prompt for it is not how the template starts the message (the "
        "conversation before it, rendered with add_generation_prompt=True, is not the start of the conversation "
        f"through it), so its tokens cannot be found; add {{% generation %}} ... {{% endgeneration %}} around the "
        f"assistant content in the template ({3 * ROWS_CHECKED} of the {3 * ROWS_CHECKED} rows checked fail)"]


def test_chat_rows_too_long_are_a_problem_and_text_rows_a_note(tmp_path):
    long_reply = "\n".join(f"{i}+1={i + 1}" for i in range(20)) + "\nanswer: 21"
    rows = [chat("what is 1+1?", "1+1=2\nanswer: 2")] * 5 + [chat("count up", long_reply)] * 3
    distill = write_rows(tmp_path / "data" / "distill.jsonl", rows)
    generic = write_rows(tmp_path / "data" / "generic.jsonl", [{"text": "word " * 40}] * 2 + [{"text": "short"}])
    plan = checked(tmp_path, f"data.distill={distill}", f"data.generic={generic}", "data.distill_on=mix")
    longest = 5 + len("count up") + len(long_reply)  # <s> <|user|> </s> <|assistant|> </s>, a token a character
    assert plan.problems == [
        f"data.distill={distill}: 3 of the 8 chat rows checked are longer than data.max_length=96 with the teacher's "
        f"tokenizer (up to {longest} tokens), so truncation would cut their assistant replies (their end and "
        f"end-of-turn token never trained on); set data.max_length to at least {longest}"]
    assert f"data.generic={generic}: 2 of the 3 rows checked are longer than data.max_length=96 (up to 202 tokens) " \
           "and will be truncated to their first 96 tokens" in plan.notes
    assert checked(tmp_path, f"data.distill={distill}", f"data.max_length={longest}").problems == []


def test_scored_rows_need_an_integer_answer(tmp_path):
    rows = [chat(f"what is {i}+1?", f"{i}+1={i + 1}\nanswer: {i + 1}", answer=str(i + 1)) for i in range(8)]
    rows[2].pop("answer")
    rows[5]["answer"] = None
    rows[6]["answer"] = "seven"
    rows[7] = {"text": "a plain row", "answer": "1"}
    folder = tmp_path / "eval"
    write_rows(folder / "test.jsonl", rows)
    write_rows(folder / "validation.jsonl", rows[:2])
    plan = checked(tmp_path, f"data.eval={folder}")
    assert plan.problems == [
        f"data.eval={folder}: test row 7 of the first {ROWS_CHECKED} are not chat rows ('messages'): scored rows are "
        "prompted through the chat template",
        f"data.eval={folder}: test rows 2, 5 of the first {ROWS_CHECKED} have no 'answer' (scored rows need the "
        "reference answer the generated one is checked against)",
        f"data.eval={folder} test split: row 6: reference answer 'seven' is not an integer (answers are checked as "
        "integers)"]


def test_rows_that_are_not_objects_or_not_json_or_without_messages_or_text(tmp_path):
    good = chat("what is 1+1?", "1+1=2\nanswer: 2")
    objects = write_rows(tmp_path / "a" / "train.jsonl", [good, good, {"prompt": "x"}, [1, 2], good, "just text"])
    broken = write_rows(tmp_path / "b" / "train.jsonl", [good, good, good, '{"messages": [}'])
    leading = write_rows(tmp_path / "c" / "train.jsonl", [[good]])
    plan = checked(tmp_path, f"data.distill={objects.parent}", f"data.sft={broken.parent}",
                   f"data.generic={leading.parent}", "data.distill_on=mix")
    assert plan.problems == [
        f"data.distill={objects.parent}: train rows 3, 5 of the first {ROWS_CHECKED} are not JSON objects (list, str): "
        "every row must be an object with 'messages' (chat) or 'text'",
        f"data.distill={objects.parent} train split: row 2 has neither 'messages' nor 'text' (keys: ['prompt'])",
        f"data.generic={leading.parent}: train row 0 of the first {ROWS_CHECKED} are not JSON objects (list): every "
        "row must be an object with 'messages' (chat) or 'text'",
        f"data.sft={broken.parent}: line 4 of {broken} is not JSON (Expecting value: line 1 column 15 (char 14))"]


def test_the_real_smollm2_template_through_the_plan(tmp_path, smollm2_tokenizer):
    """A random tiny Llama with SmolLM2's tokenizer: the demo data through ChatML with SmolLM2's default system
    prompt (57-81 tokens over 300 demo rows) fits the default data.max_length 96; a shorter one does not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "models" / "smollm2-tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    plan = checked(tmp_path, "teacher=local", f"teacher.path={folder}")
    assert plan.problems == []
    facts = [note for note in plan.notes if note.startswith("data rows")]
    assert len(facts) == 1 and "rendering each conversation turn by turn (the template has no {% generation %} " \
                               "markers); data.max_length=96)" in facts[0], facts
    short = checked(tmp_path, "teacher=local", f"teacher.path={folder}", "data.max_length=64").problems
    assert len(short) == 1 and short[0].startswith(
        "the bundled demo reasoning traces (data.eval, data.distill, data.sft unset): ") and \
        "longer than data.max_length=64" in short[0], short
