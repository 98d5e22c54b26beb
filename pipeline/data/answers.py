"""Final-answer extraction and checking for the reasoning traces.

A trace ends with a line ``answer: <integer>``. The checker takes the *last* such line in the text, so
a model that rambles on and writes a second answer is judged by its final word.
"""

from __future__ import annotations

import re

__all__ = ["ANSWER_PREFIX", "extract_answer", "format_answer", "is_correct", "reference_answer"]

ANSWER_PREFIX = "answer:"

# "answer:" (any case), optional spaces, a signed integer; the integer must not run into more digits.
_ANSWER_RE = re.compile(r"answer\s*:\s*([+-]?\d+)(?!\d)", re.IGNORECASE)


def format_answer(value: int | str) -> str:
    """The final line a trace ends with, e.g. ``answer: 7``."""
    return f"{ANSWER_PREFIX} {value}"


def _normalise(number: str) -> str:
    """Canonical integer text: no leading '+', no leading zeros, '-0' -> '0'."""
    return str(int(number))


def extract_answer(text: str) -> str | None:
    """The last ``answer: N`` in ``text`` as a canonical integer string, or None if there is none."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    return _normalise(matches[-1])


def reference_answer(answer: str | int) -> str:
    """A row's reference answer as a canonical integer string; ValueError when it is not an integer."""
    try:
        return _normalise(str(answer).strip())
    except ValueError as err:
        raise ValueError(f"reference answer {answer!r} is not an integer") from err


def is_correct(text: str, answer: str | int) -> bool:
    """True when the final answer written in ``text`` equals ``answer`` (compared as integers)."""
    predicted = extract_answer(text)
    if predicted is None:
        return False
    return predicted == reference_answer(answer)
