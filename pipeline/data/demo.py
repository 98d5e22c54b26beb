"""Bundled demo data: arithmetic reasoning traces (chat rows) and a generic plain-text corpus.

Everything is generated from a seed, so the same config gives byte-identical files. The settings
(``DemoDataConfig``, and ``DemoTeacherConfig`` for the tiny CPU demo teacher) live in `pipeline.config.demo`
with the rest of the configuration; they are re-exported here.

Reasoning row (chat form)::

    {"messages": [{"role": "user", "content": "what is 3+5-2?"},
                  {"role": "assistant", "content": "3+5=8\\n8-2=6\\nanswer: 6"}],
     "answer": "6"}

Text row (pre-training-like)::

    {"text": "mia saw 4 red boxes at the market. note: the park opens at 7."}
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config.demo import DemoDataConfig, DemoDataError, DemoTeacherConfig

from .answers import format_answer

__all__ = [
    "SPLITS",
    "DemoDataConfig",
    "DemoData",
    "DemoTeacherConfig",
    "DemoDataError",
    "make_problem",
    "generate_demo_data",
    "write_demo_data",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")


# --------------------------------------------------------------------------------------------------
# reasoning traces
# --------------------------------------------------------------------------------------------------


def make_problem(start: int, steps: list[tuple[str, int]]) -> dict[str, Any]:
    """Build one chat row from a start value and (op, operand) steps; ops are '+' or '-'."""
    if not steps:
        raise DemoDataError("a problem needs at least one step")
    expression = str(start)
    lines: list[str] = []
    value = start
    for op, operand in steps:
        if op == "+":
            new = value + operand
        elif op == "-":
            new = value - operand
        else:
            raise DemoDataError(f"unknown operator {op!r} (expected '+' or '-')")
        expression += f"{op}{operand}"
        lines.append(f"{value}{op}{operand}={new}")
        value = new
    lines.append(format_answer(value))
    return {
        "messages": [
            {"role": "user", "content": f"what is {expression}?"},
            {"role": "assistant", "content": "\n".join(lines)},
        ],
        "answer": str(value),
    }


def _sample_steps(rng: random.Random, cfg: DemoDataConfig) -> tuple[int, list[tuple[str, int]]]:
    """One random chain whose intermediate results all stay in [0, max_value]."""
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    value = rng.randint(cfg.min_operand, min(cfg.max_operand, cfg.max_value))
    start = value
    steps: list[tuple[str, int]] = []
    for _ in range(n_ops):
        choices = [
            (op, b)
            for op in ("+", "-")
            for b in range(cfg.min_operand, cfg.max_operand + 1)
            if 0 <= (value + b if op == "+" else value - b) <= cfg.max_value
        ]
        op, b = rng.choice(choices)  # never empty: max_value >= max(1, min_operand)
        value = value + b if op == "+" else value - b
        steps.append((op, b))
    return start, steps


def _unique_rows(sample: Callable[[random.Random], tuple[str, dict[str, Any]]], rng: random.Random,
                 counts: dict[str, int], what: str) -> dict[str, list[dict[str, Any]]]:
    """Draw unique rows (by key) and deal them to splits in the order test, validation, train.

    Filling test first keeps the test set fixed when only ``n_train`` changes.
    """
    total = sum(counts.values())
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    attempts, max_attempts = 0, 50 * total + 1000
    while len(rows) < total:
        attempts += 1
        if attempts > max_attempts:
            raise DemoDataError(
                f"could only generate {len(rows)} unique {what} rows of the {total} requested; "
                "lower the counts or widen the task (more ops, larger max_value)"
            )
        key, row = sample(rng)
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    out: dict[str, list[dict[str, Any]]] = {}
    begin = 0
    for split in ("test", "validation", "train"):
        out[split] = rows[begin : begin + counts[split]]
        begin += counts[split]
    return {split: out[split] for split in SPLITS}


def _reasoning_splits(cfg: DemoDataConfig) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(f"hybrid-distill/reasoning/{cfg.seed}")

    def sample(r: random.Random) -> tuple[str, dict[str, Any]]:
        start, steps = _sample_steps(r, cfg)
        row = make_problem(start, steps)
        return row["messages"][0]["content"], row

    counts = {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
    return _unique_rows(sample, rng, counts, "reasoning")


# --------------------------------------------------------------------------------------------------
# generic text corpus
# --------------------------------------------------------------------------------------------------

_NAMES = ("mia", "tom", "ada", "sam", "lea", "ben", "ivy", "max", "zoe", "kai", "eva", "leo", "nina", "omar")
_NOUNS = ("box", "cat", "book", "lamp", "cup", "tree", "bird", "coin", "key", "ship", "hat", "rock",
          "door", "road", "map", "fish", "bell", "star", "shoe", "card", "jar", "wheel")
_ADJS = ("red", "blue", "old", "new", "small", "big", "quiet", "warm", "cold", "green", "dark", "bright",
         "round", "soft", "heavy", "quick")
_PLACES = ("market", "park", "river", "school", "garden", "station", "farm", "harbor", "library", "hill")
_VERBS = ("sees", "finds", "paints", "moves", "likes", "keeps", "draws", "counts", "carries", "opens")


def _code(rng: random.Random) -> str:
    """A random label like 'k4-x+7=b': letters and digits alternate around the symbols, so it is
    never an equation between numbers."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    parts = [rng.choice(letters), str(rng.randint(0, 9))]
    for k in range(rng.randint(1, 3)):
        parts.append(rng.choice("+-="))
        parts.append(rng.choice(letters) if k % 2 == 0 else str(rng.randint(0, 9)))
    return "".join(parts)


def _sentence(rng: random.Random) -> str:
    name, name2 = rng.sample(_NAMES, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    adj, adj2 = rng.sample(_ADJS, 2)
    place = rng.choice(_PLACES)
    verb = rng.choice(_VERBS)
    n, m = rng.randint(0, 9), rng.randint(10, 99)
    templates = (
        f"{name} has {n} {noun}s.",
        f"the {adj} {noun} is near the {place}.",
        f"{name} saw {n} {adj} {noun}s at the {place}.",
        f"is the {noun} {adj}? yes, it is {adj} and {adj2}.",
        f"note: the {place} opens at {n}.",
        f"{name} wrote the code {_code(rng)} on a {noun}.",
        f"what is the {noun}? it is a {adj} {noun2}.",
        f"the {adj} {noun} {verb} the {noun2} of {name2}.",
        f"{name} {verb} {m} {noun}s by the {place}.",
        f"answer: {name} {verb} the {adj} {noun}.",
        f"room {m}-{n} is next to the {place}.",
        f"{name} and {name2} walk to the {place} with a {noun}.",
        f"a sign says {noun}+{noun2}={place}.",
        f"there are {m} {noun}s on the {adj} {noun2}.",
    )
    return rng.choice(templates)


def _text_splits(cfg: DemoDataConfig) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(f"hybrid-distill/text/{cfg.seed}")

    def sample(r: random.Random) -> tuple[str, dict[str, Any]]:
        k = r.randint(cfg.min_sentences, cfg.max_sentences)
        sentences = [_sentence(r) for _ in range(k)]
        text = sentences[0]
        for s in sentences[1:]:
            text += r.choice((" ", "\n")) + s
        return text, {"text": text}

    counts = {"train": cfg.n_text_train, "validation": cfg.n_text_validation, "test": cfg.n_text_test}
    return _unique_rows(sample, rng, counts, "text")


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


@dataclass
class DemoData:
    """In-memory demo data: ``reasoning[split]`` chat rows and ``text[split]`` plain-text rows."""

    config: DemoDataConfig
    reasoning: dict[str, list[dict[str, Any]]]
    text: dict[str, list[dict[str, Any]]]

    def iter_files(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """(relative path, rows) for every file ``write_demo_data`` writes."""
        for kind, splits in (("reasoning", self.reasoning), ("text", self.text)):
            for split in SPLITS:
                yield f"{kind}/{split}.jsonl", splits[split]


def generate_demo_data(config: DemoDataConfig | None = None, **overrides: Any) -> DemoData:
    """Generate the demo data in memory; keyword overrides replace config fields (e.g. ``seed=1``)."""
    cfg = config or DemoDataConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DemoDataConfig)})
        if unknown:
            raise DemoDataError(f"unknown DemoDataConfig field(s): {', '.join(unknown)}")
        cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return DemoData(config=cfg, reasoning=_reasoning_splits(cfg), text=_text_splits(cfg))


def write_demo_data(folder: str | Path, config: DemoDataConfig | None = None, **overrides: Any) -> dict[str, Path]:
    """Write ``reasoning/{train,validation,test}.jsonl``, ``text/...`` and ``demo_config.json`` under folder.

    Each sub-folder loads directly with ``datasets.load_dataset(str(folder / "reasoning"))``.
    Returns a map from relative path to written path.
    """
    data = generate_demo_data(config, **overrides)
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise DemoDataError(f"demo data folder {str(root)!r} exists and is not a directory")
    written: dict[str, Path] = {}
    for rel, rows in data.iter_files():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        written[rel] = path
    meta = root / "demo_config.json"
    meta.write_text(json.dumps(data.config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written["demo_config.json"] = meta
    return written
