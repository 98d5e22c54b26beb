import pytest

from pipeline.data.answers import extract_answer, format_answer, is_correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3+4=7\nanswer: 7", "7"),
        ("answer: 7", "7"),
        ("Answer:  -3", "-3"),
        ("answer:07", "7"),
        ("answer: +5", "5"),
        ("answer: -0", "0"),
        ("answer: 1\n1+1=2\nanswer: 2", "2"),  # the last answer line counts
        ("answer: 12</s>", "12"),
        ("3+4=7", None),
        ("answer: seven", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("2+2=4\nanswer: 4", "4")
    assert is_correct("2+2=4\nanswer: 4", 4)
    assert is_correct(format_answer(13), " 13 ")
    assert not is_correct("2+2=4\nanswer: 5", "4")
    assert not is_correct("2+2=4\nanswer: 45", "4")
    assert not is_correct("2+2=4", "4")


def test_bad_reference_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="not an integer"):
        is_correct("answer: 4", "four")


def test_non_string_text_is_a_type_error():
    with pytest.raises(TypeError):
        extract_answer(None)  # type: ignore[arg-type]
