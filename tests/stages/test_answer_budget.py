"""The greedy-decoding budget of LOO and the evaluation against the reference replies it is meant to
reproduce: a budget that cuts more than MAX_CUT_SHARE of them is refused in one line (a cut reply scores
as wrong, so accuracy, and LOO's ranking built on it, would measure the budget instead of the model)."""

from __future__ import annotations

import pytest

from pipeline.data import build_char_tokenizer
from pipeline.stages.common import MAX_CUT_SHARE, StageError, check_answer_budget


def problem(reply: str) -> dict:
    return {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": reply}], "answer": "1"}


def test_a_budget_that_cuts_too_many_replies_is_refused_naming_the_setting_and_the_length_needed():
    tokenizer = build_char_tokenizer()  # one token a character
    problems = [problem("x" * 10)] * 18 + [problem("y" * 30)] * 2  # 10% longer than 20
    with pytest.raises(StageError) as error:
        check_answer_budget(problems, tokenizer, "loo.max_new_tokens", 20)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("loo.max_new_tokens=20 is shorter than the reference replies of 2 of the 20 problems")
    assert "at least 30" in message


def test_a_budget_that_fits_or_cuts_only_a_few_passes():
    tokenizer = build_char_tokenizer()
    check_answer_budget([problem("x" * 30)] * 20, tokenizer, "evaluate.max_new_tokens", 30)  # exactly fits
    few = [problem("x" * 10)] * 99 + [problem("y" * 30)]
    assert 1 <= MAX_CUT_SHARE * len(few)
    check_answer_budget(few, tokenizer, "evaluate.max_new_tokens", 20)  # 1% cut: allowed
    check_answer_budget([{"answer": "1", "messages": [{"role": "user", "content": "q?"}]}] * 3, tokenizer,
                        "evaluate.max_new_tokens", 1)  # no reference reply: nothing to judge
