"""The data a stage reads (`StageData`): its training batches, its evaluation rows and LOO's rows.

Contract:
- A stage builds `StageData(data, tokenizer)` from its view of the data section (`DataConfig.view`: only the
  sources it reads) and its teacher's tokenizer; each source is the configured one (a local file or folder,
  a URL, a hub dataset) or, when None, the bundled demo data (`pipeline.data.demo`).
- Rows (`rows`), tokenised rows (`tokenized`) and the deterministic batch streams training resumes from
  (`batch_source`) come from `pipeline.data.loading` and `pipeline.data.batching`; generated and tokenised
  rows are shared by the stages of one process (`_PROCESS_ROW_CACHE`), keyed by everything that determines them.
- Held-out rows: LOO scores on data.eval's validation split, else data.distill's, else the last
  `held_out_count` train rows of data.distill (`selection`), which training then never sees (`rows`).
  Evaluation reads data.eval's test split (`eval_problems`, `eval_batches`); LOO never does.
- Mixing: data.distill_on=mix (`distillation_source`) trains on reasoning traces and generic text, the first
  `mix_share` rows of each.
- Answer budget: problems scored by greedy decoding are refused (`check_answer_budget`) when the decoding
  budget would cut the reference replies of more than MAX_CUT_SHARE of them.
- Its own refusals (evaluation rows without an 'answer' column, a budget too short, too few train rows to
  hold out) raise `pipeline.errors.StageError` in one line, the class the stages raise and their callers
  catch; a source that does not load raises `pipeline.data.loading`'s DataLoadError.
- This module imports nothing from `pipeline.stages`; `pipeline.stages.common` re-exports its names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, to_plain
from pipeline.errors import StageError

VALIDATION_SPLIT = "validation"
MIX = "mix"  # data.distill_on=mix: reasoning traces and generic text, as many rows of each
MIX_PARTS = ("distill", "generic")

# Generated demo data and tokenised datasets, shared by every stage of this process (a chain runs its
# stages in one process: each would otherwise regenerate and re-tokenise the same rows). Keyed by what
# determines them: the one-kind view of the stage's DataConfig (`DataConfig.view(kind)`: the source, the
# demo settings that generate it, validation_share, max_length) with the split and, for local files, their
# sizes and times; and the tokenizer's vocabulary and chat template. Bounded: the oldest entry goes first.
_PROCESS_ROW_CACHE: dict[tuple, Any] = {}
_PROCESS_ROW_CACHE_SIZE = 16


def _process_cached(key: tuple, build):
    if key not in _PROCESS_ROW_CACHE:
        while len(_PROCESS_ROW_CACHE) >= _PROCESS_ROW_CACHE_SIZE:
            _PROCESS_ROW_CACHE.pop(next(iter(_PROCESS_ROW_CACHE)))
        _PROCESS_ROW_CACHE[key] = build()
    return _PROCESS_ROW_CACHE[key]


def tokenizer_digest(tokenizer) -> str:
    import hashlib

    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, type(tokenizer).__name__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def padding_id(tokenizer) -> int:
    """The id right-padding is filled with: the tokenizer's pad token, else its eos (many released teachers
    have no pad token), else 0. Padded positions are outside every row's length and loss mask, so the value
    only has to be a valid id."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


@dataclass
class StageData:
    """The data a stage reads, loaded once per stage: demo data by default, any `datasets` source by config.
    Generated and tokenised rows are shared across the stages of one process (see `_PROCESS_ROW_CACHE`).

    `data` is the stage's view of the data section (`DataConfig.view`): only the sources it reads.
    """

    data: DataConfig
    tokenizer: Any
    _cache: dict[str, Any] = field(default_factory=dict)

    def with_generic(self, folder: str | os.PathLike | None) -> StageData:
        """This stage's data with the generic text read from `folder` (the `samples` stage's output, given
        to a stage as its `generic` input when data.generic=teacher); unchanged for None."""
        if folder is None:
            return self
        import dataclasses

        return StageData(dataclasses.replace(self.data, generic=str(folder)), self.tokenizer)

    def _demo(self):
        if "demo" not in self._cache:
            from pipeline.data import generate_demo_data

            demo_cfg = self.data.demo
            key = ("demo", json.dumps(to_plain(demo_cfg), sort_keys=True))
            self._cache["demo"] = _process_cached(key, lambda: generate_demo_data(demo_cfg))
        return self._cache["demo"]

    def _source_key(self, kind: str, split: str) -> tuple:
        """What determines rows(kind, split): the one-kind view of `data`, the split, local files' states."""
        view = json.dumps(to_plain(self.data.view(kind)), sort_keys=True)
        source = getattr(self.data, kind)
        path = Path(str(source)) if source is not None else None
        if path is not None and path.exists():  # a local file or folder: it may change within one process
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            return (view, kind, split, str(path.resolve()),
                    tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
        return (view, kind, split)

    def rows(self, kind: str, split: str):
        """Raw rows of `kind` (distill, sft, eval, generic) for `split` (train, validation, test)."""
        key = f"rows:{kind}:{split}"
        if key not in self._cache:
            from pipeline.data import load_rows

            source = getattr(self.data, kind)
            if source is None:
                demo = self._demo()
                source, split = (demo.text if kind == "generic" else demo.reasoning)[split], "train"
            rows = load_rows(source, split)
            if kind == "distill" and split == "train" and self.distill_holds_out():
                rows = rows.select(range(len(rows) - held_out_count(len(rows), self.data.validation_share)))
            self._cache[key] = rows
        return self._cache[key]

    def selection(self) -> tuple[str, Any]:
        """Where LOO's rows come from (never the test split): ("eval", "validation") when data.eval has
        validation files (the demo does), ("distill", "validation") when data.distill has, else
        ("held_out", n): the last n train rows of data.distill, which training then skips."""
        if "selection" not in self._cache:
            self._cache["selection"] = _selection(self.data)
        return self._cache["selection"]

    def distill_holds_out(self) -> bool:
        """A user's data.distill without validation files lends its last train rows to LOO, never trained on."""
        source = self.data.distill
        return source is not None and not _has_split(source, VALIDATION_SPLIT)

    def selection_rows(self):
        where, detail = self.selection()
        if where == "held_out":
            from pipeline.data import load_rows

            rows = load_rows(self.data.distill, "train")
            return rows.select(range(len(rows) - detail, len(rows)))
        return self.rows(where, detail)

    def describe(self, kind: str, split: str = "train") -> dict[str, Any]:
        """What a stage trained on, for its stage.json (and MLflow's dataset inputs): `datasets`'
        fingerprint of the rows as the digest, the configured source (or the demo generator and its seed)."""
        if kind == MIX:
            parts = [self.describe(part, split) for part in MIX_PARTS]
            share = self.mix_share(split)
            return {"name": f"mix-{split}", "source": " + ".join(part["source"] for part in parts),
                    "digest": "+".join(part["digest"] for part in parts), "rows": 2 * share,
                    "columns": parts[0]["columns"]}
        rows = self.rows(kind, split)
        source = getattr(self.data, kind)
        return {"name": f"{kind}-{split}", "source": source or f"demo:{'generic' if kind == 'generic' else 'reasoning'}"
                f"?seed={self.data.demo.seed}", "digest": rows._fingerprint, "rows": len(rows),
                "columns": list(rows.column_names)}

    def mix_share(self, split: str = "train") -> int:
        """Rows of each part in the even mix: as many as the smaller part has."""
        return min(len(self.rows(part, split)) for part in MIX_PARTS)

    def tokenized(self, kind: str, split: str = "train"):
        key = f"tok:{kind}:{split}"
        if key not in self._cache and kind == MIX:  # the first `mix_share` rows of each part, in equal shares
            import datasets

            share = self.mix_share(split)
            parts = [self.tokenized(part, split) for part in MIX_PARTS]
            self._cache[key] = datasets.concatenate_datasets(
                [part.filter(lambda row: row["source_index"] < share, keep_in_memory=True) for part in parts])
        if key not in self._cache:
            from pipeline.data import tokenize_rows

            shared_key = ("tokenized", *self._source_key(kind, split), tokenizer_digest(self.tokenizer))
            self._cache[key] = _process_cached(shared_key, lambda: tokenize_rows(self.rows(kind, split), self.tokenizer,
                                                                          self.data.max_length))
        return self._cache[key]

    def batch_source(self, kind: str, batch_size: int, seed: int):
        """position -> iterator of padded batches, deterministic, so training resumes mid-epoch."""
        from pipeline.data import iter_batches

        dataset = self.tokenized(kind)
        pad_id = padding_id(self.tokenizer)

        def from_position(position: int):
            return iter_batches(dataset, batch_size, pad_id, seed=seed, start=position)

        return from_position

    def problems(self, rows, count: int, budget: tuple[str, int] | None = None) -> list[dict[str, Any]]:
        """The first `count` rows as problems with checkable answers. `budget` (setting name, new tokens):
        refused when the reference replies of more than MAX_CUT_SHARE of them are longer than that many
        tokens, since greedy answers cut there would be scored as wrong (see `check_answer_budget`)."""
        if "answer" not in rows.column_names:
            raise StageError("evaluation data needs an 'answer' column to check generated answers")
        problems = [rows[i] for i in range(min(count, len(rows)))]
        if budget is not None:
            check_answer_budget(problems, self.tokenizer, *budget)
        return problems

    def batches(self, rows, count: int, batch_size: int = 32):
        """The first `count` rows as padded batches, in order (NLL / KL)."""
        from pipeline.data import iter_batches, tokenize_rows

        dataset = tokenize_rows(rows.select(range(min(count, len(rows)))), self.tokenizer, self.data.max_length)
        return list(iter_batches(dataset, batch_size, padding_id(self.tokenizer), shuffle=False,
                                 stop=(len(dataset) + batch_size - 1) // batch_size))

    def eval_problems(self, count: int, budget: tuple[str, int] | None = None) -> list[dict[str, Any]]:
        return self.problems(self.rows("eval", "test"), count, budget)

    def eval_batches(self, count: int, batch_size: int = 32):
        return self.batches(self.rows("eval", "test"), count, batch_size)


# Share of scored problems whose reference reply may be longer than the decoding budget.
MAX_CUT_SHARE = 0.05


def reference_reply(row: dict[str, Any]) -> str | None:
    """The last assistant message of a chat row (the reference reply), or None when it has none."""
    for message in reversed(row.get("messages") or []):
        if message.get("role") == "assistant":
            return str(message.get("content", ""))
    return None


def check_answer_budget(problems: list[dict[str, Any]], tokenizer, setting: str, max_new_tokens: int) -> None:
    """Refuses a greedy-decoding budget shorter than the reference replies of more than MAX_CUT_SHARE of
    the problems: a reply cut before its final answer scores as wrong, so accuracy (and LOO's ranking
    built on it) would measure the budget, not the model. Rows without an assistant reply are not judged."""
    lengths = [len(tokenizer(reply, add_special_tokens=False)["input_ids"])
               for reply in map(reference_reply, problems) if reply is not None]
    cut = [n for n in lengths if n > max_new_tokens]
    if lengths and len(cut) > MAX_CUT_SHARE * len(lengths):
        raise StageError(
            f"{setting}={max_new_tokens} is shorter than the reference replies of {len(cut)} of the {len(lengths)} "
            f"problems scored (longest {max(lengths)} tokens): their answers would be cut and scored as wrong; "
            f"set {setting} to at least {max(lengths)}")


def held_out_count(train_rows: int, share: float) -> int:
    return int(train_rows * share)


def _has_split(source: Any, split: str) -> bool:
    """Whether a user source (a folder of files, or a hub name) has `split` (a single file, local or at a
    URL, has only itself)."""
    from pipeline.data.loading import is_url

    text = str(source)
    if is_url(text):
        return False
    path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
    if path.is_dir():
        from pipeline.data.loading import files_by_split

        return split in files_by_split(path)
    if path.exists():
        return False
    from pipeline.data import DataLoadError, load_rows

    try:
        load_rows(text, split)
        return True
    except DataLoadError:  # no such split at the hub (or no such dataset): load_rows wraps every cause in it
        return False


def _selection(data: DataConfig) -> tuple[str, Any]:
    for kind in ("eval", "distill"):
        source = getattr(data, kind)
        if source is None or _has_split(source, VALIDATION_SPLIT):
            return kind, VALIDATION_SPLIT
    from pipeline.data import load_rows

    rows = len(load_rows(data.distill, "train"))
    count = held_out_count(rows, data.validation_share)
    if count < 1:
        raise StageError(f"LOO needs validation rows: give data.eval or data.distill validation* files "
                         f"(data.distill's {rows} train rows are too few to hold out "
                         f"data.validation_share={data.validation_share})")
    return "held_out", count


def distillation_source(data: DataConfig) -> str:
    """What the distillations train on: "distill" (reasoning traces), "generic" or "mix" (both)."""
    return data.distill_on if data.distill_on in ("generic", "mix") else "distill"


__all__ = [
    "MAX_CUT_SHARE",
    "MIX",
    "MIX_PARTS",
    "VALIDATION_SPLIT",
    "StageData",
    "check_answer_budget",
    "distillation_source",
    "held_out_count",
    "padding_id",
    "reference_reply",
    "tokenizer_digest",
]
