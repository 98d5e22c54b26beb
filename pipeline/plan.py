"""The whole run checked before any stage starts, and printed as a plan.

`plan(cfg, ...)` reads only small things -- the teacher's config.json, file list and tokenizer (no
weights), the first rows of each data source (tokenised with the teacher's tokenizer), the store's
manifests, the device -- and returns a `Plan`: every problem
found, one line each (all of them at once), and for each stage its output name, cache key, what will
happen (skip / resume / run) and its inputs. It writes nothing. `python -m flows.convert --plan` prints
it; every run checks it first and stops on the first line of trouble, before anything is computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.executor import Executor, Output, Source, StageCall, cache_key, input_digest
from pipeline.model.checkpoint import SUPPORTED_ARCHITECTURES, TOKENIZER_FILES, config_files, has_experts
from pipeline.redaction import redact_text
from pipeline.store import LocalStore, Store, StoreError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class PlanError(ConfigError):
    """The run cannot work: one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        problems = [redact_text(problem) for problem in problems]  # a config value's secret stays out
        super().__init__("\n".join(problems))
        self.problems = problems


class _RedactedLines(list):
    """The plan's problem lines: every line appended is redacted (a secret interpolated into a config
    value never reaches the console, Prefect or a log)."""

    def __init__(self, lines=()) -> None:
        super().__init__(redact_text(line) for line in lines)

    def append(self, line: str) -> None:
        super().append(redact_text(line))

    def extend(self, lines) -> None:
        super().extend(redact_text(line) for line in lines)


@dataclass
class PlanRow:
    name: str
    stage: str
    key: str | None  # None: it depends on an output not computed yet
    status: str  # skip | resume | run
    inputs: list[str]


@dataclass
class Plan:
    rows: list[PlanRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.problems = _RedactedLines(self.problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_problems(self) -> None:
        if self.problems:
            raise PlanError(self.problems)

    def render(self) -> str:
        stage = max([len("stage"), *(len(row.stage) for row in self.rows)])
        output = max([12, *(len(row.name) for row in self.rows)])
        lines = [f"{'stage':<{stage}} {'output':<{output}} {'key':<12} {'action':<7} inputs"]
        for row in self.rows:
            lines.append(f"{row.stage:<{stage}} {row.name:<{output}} {(row.key or '(pending)')[:12]:<12} "
                         f"{row.status:<7} {', '.join(row.inputs) or '-'}")
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"problem: {problem}" for problem in self.problems]
        return redact_text("\n".join(lines))


# --- checks ----------------------------------------------------------------------------------------

def teacher_shape(cfg: RunConfig, source: Source | None, problems: list[str]) -> dict[str, Any] | None:
    """The teacher's config.json (or the demo teacher's shape), checked; None if unusable."""
    if not cfg.teacher.path:
        from pipeline.data import build_char_tokenizer

        demo = cfg.teacher.demo
        return {"num_hidden_layers": demo.num_hidden_layers, "hidden_size": demo.hidden_size,
                "num_attention_heads": demo.num_attention_heads, "num_key_value_heads": demo.num_key_value_heads,
                "intermediate_size": demo.intermediate_size, "vocab_size": len(build_char_tokenizer())}
    if source is None:
        return None
    where = f"teacher.path={cfg.teacher.path}"
    files = set(source.files)
    if is_gguf(source):
        return gguf_shape(where, source, problems)
    if "config.json" not in files:
        problems.append(f"{where} has no config.json: it must be a saved transformers checkpoint")
        return None
    try:
        config = json.loads(source.read("config.json"))
    except (ValueError, OSError, StoreError) as error:
        problems.append(f"{where}: config.json is unreadable ({str(error).splitlines()[0]})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{where}: config.json holds a JSON {type(config).__name__}, not an object: it must be "
                        "a saved transformers config")
        return None
    from pipeline.model.config import LAYER_KINDS
    from pipeline.model.layouts import APRIEL_MODEL_TYPE, MIL_CONFIG

    architectures = config.get("architectures") or [f"model_type {config.get('model_type')!r}"]
    released = config.get("model_type") == APRIEL_MODEL_TYPE or MIL_CONFIG in files  # imported as hybrids
    if not released and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        problems.append(f"{where} is a {', '.join(architectures)}: unsupported teacher architecture; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return None
    if has_experts(config):
        problems.append(f"{where} has mixture-of-experts layers: unsupported teacher")
    other = sorted({kind for kind in config.get("layer_types") or [] if kind not in LAYER_KINDS})
    if other:
        problems.append(f"{where} has layer types {other}: only attention, Mamba and identity layers are known")
    if not files & set(WEIGHT_FILES):
        problems.append(f"{where} has no weights (none of {', '.join(WEIGHT_FILES)})")
    if not files & set(TOKENIZER_FILES):
        problems.append(f"{where} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            problems.append(f"{where}: config.json has no integer {key}")
            return None
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def gguf_shape(where: str, source: Source, problems: list[str]) -> dict[str, Any] | None:
    """A GGUF teacher's shape from its header (metadata only: the tensors are not read)."""
    from pipeline.model.gguf import GGUFError, read_header

    try:
        header = read_header(source.fetch())
    except (GGUFError, OSError) as error:
        problems.append(f"{where}: {str(error).splitlines()[0]}")
        return None
    return dict(header.config)


def is_gguf(source: Source | None) -> bool:
    """A GGUF teacher's Source lists its one .gguf file."""
    return source is not None and len(source.files) == 1 and source.files[0].lower().endswith(".gguf")


def check_teacher_files(cfg: RunConfig, source: Source, config: dict[str, Any], problems: list[str]) -> None:
    """Before anything loads the teacher: no code of its own folder would be needed (config.json's or
    tokenizer_config.json's auto_map), its weights are floats, and, for a folder on this machine, its
    tokenizer loads (never running code) and fits its embedding."""
    from pipeline.model.config import HybridConfig
    from pipeline.stages.common import code_refusal, incomplete_weights, local_folder, non_float_weights

    where = f"teacher.path={cfg.teacher.path}"
    if config.get("auto_map") and config.get("model_type") != HybridConfig.model_type:
        problems.append(code_refusal(where, "config.json", config["auto_map"]))
        return
    if "tokenizer_config.json" in source.files:
        try:
            tokenizer_config = json.loads(source.read("tokenizer_config.json"))
        except (ValueError, OSError, StoreError) as error:
            problems.append(f"{where}: tokenizer_config.json is unreadable ({str(error).splitlines()[0]})")
            return
        if isinstance(tokenizer_config, dict) and tokenizer_config.get("auto_map"):
            problems.append(code_refusal(where, "tokenizer_config.json", tokenizer_config["auto_map"]))
            return
    folder = local_folder(cfg.teacher.path)
    if folder is None or not folder.is_dir():  # an s3:// teacher: the stage checks what needs its weights
        if config.get("quantization_config"):
            problems.append(f"{where}: config.json has a quantization_config: a quantised checkpoint cannot be "
                            "distilled from; give its unquantised (float) weights")
        return
    quantised = non_float_weights(folder) or incomplete_weights(folder)
    if quantised:
        problems.append(f"{where}: {quantised}")
        return
    from pipeline.data import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except TokenizerError as error:
        problems.append(f"{where}: {str(error).splitlines()[0]}")
        return
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        problems.append(f"{where}: its tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                        f"{vocab}: the tokenizer does not belong to these weights")


def read_config(where: str, source: Source, problems: list[str]) -> tuple[dict, dict | None] | None:
    """(config.json, mamba_config.json or None) of a Source, or None with a problem line."""
    if "config.json" not in source.files:
        problems.append(f"{where} has no config.json: it must be a saved transformers checkpoint")
        return None
    try:
        return config_files(source.read, lambda name: name in source.files)
    except (ValueError, OSError, StoreError) as error:
        problems.append(f"{where}: its config files are unreadable ({str(error).splitlines()[0]})")
        return None


def mamba_count(where: str, config: dict, mamba: dict | None, problems: list[str]) -> int | None:
    """How many converted (Mamba or Gated DeltaNet) layers a checkpoint's config files declare (0 for a
    plain teacher)."""
    from pipeline.model.config import RECURRENT_KINDS
    from pipeline.model.layouts import LayoutError, layer_kinds

    try:
        return sum(kind in RECURRENT_KINDS for kind in layer_kinds(config, mamba))
    except LayoutError as error:
        problems.append(f"{where}: {str(error).splitlines()[0]}")
        return None


def check_start(cfg: RunConfig, source: Source, teacher: dict[str, Any] | None, problems: list[str]) -> None:
    """The start checkpoint (start.path): a hybrid in a layout read here, with weights, the teacher's
    shapes, and fewer Mamba layers than every schedule count. Reads its config files only."""
    from pipeline.chain import check_start_counts
    from pipeline.model.layouts import detect_layout_of
    from pipeline.stages.start import shape_mismatches

    where = f"start.path={cfg.start.path}"
    found = read_config(where, source, problems)
    if found is None:
        return
    config, mamba = found
    n_mamba = mamba_count(where, config, mamba, problems)
    if n_mamba is None:
        return
    if not n_mamba:
        problems.append(f"{where} is not a hybrid (no Mamba layer; layout {detect_layout_of(config, mamba)}): "
                        "start.path continues a hybrid's conversion, a plain transformer is a teacher (teacher.path)")
        return
    if not set(source.files) & set(WEIGHT_FILES):
        problems.append(f"{where} has no weights (none of {', '.join(WEIGHT_FILES)})")
    mismatched = shape_mismatches(config, teacher) if teacher is not None else []
    if mismatched:
        problems.append(f"{where} does not fit the teacher: {'; '.join(mismatched)}")
    try:
        check_start_counts(cfg, n_mamba)
    except ConfigError as error:
        problems.append(str(error))


def check_schedule_and_mamba(cfg: RunConfig, shape: dict[str, Any], problems: list[str]) -> None:
    layers = shape["num_hidden_layers"]
    try:
        cfg.schedule.validate(layers)
    except ConfigError as error:
        problems.append(str(error))
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // heads
    try:
        from pipeline.model.config import HybridConfig, HybridConfigError

        HybridConfig(vocab_size=shape.get("vocab_size") or 1, hidden_size=shape["hidden_size"],
                     intermediate_size=shape.get("intermediate_size") or 4 * shape["hidden_size"],
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, mamba_d_state=cfg.mamba.d_state, mamba_dt_rank=cfg.mamba.dt_rank,
                     mamba_d_conv=cfg.mamba.d_conv, mamba_gqa_expansion=cfg.mamba.gqa_expansion,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)  # shape only: no token ids
    except HybridConfigError as error:
        problems.append(f"mamba settings do not fit the teacher (d_inner = {heads}x{head_dim}, "
                        f"d_xb = {kv_heads}x{head_dim}): {str(error).splitlines()[0]}")
    except (TypeError, ValueError) as error:
        problems.append(f"mamba settings do not fit the teacher: {str(error).splitlines()[0]}")


def _first_row(path: Path) -> dict[str, Any] | None:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {name: None for name in pq.read_schema(path).names}
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".json":
            head = handle.read(1)
            handle.seek(0)
            if head == "[":
                rows = json.load(handle)
                return rows[0] if rows else None
        for line in handle:
            if line.strip():
                return json.loads(line)
    return None


def check_data(name: str, source: str | None, split: str, columns: tuple[str, ...], problems: list[str]) -> None:
    """A local data source: it exists, has `split` (folders group files by name) and `columns` in its rows.
    Hub names are left to the stage (no network here)."""
    if source is None:
        return
    from pipeline.data.loading import is_url

    if is_url(source):  # read over the network by the stage (no network here)
        return
    text = source[len("file://"):] if source.startswith("file://") else source
    path = Path(text).expanduser()
    looks_local = text.startswith(("/", "./", "../", "~")) or path.suffix in DATA_SUFFIXES
    if not path.exists():
        if looks_local:
            problems.append(f"data.{name}={source}: no such file or folder")
        return
    if path.is_dir():
        from pipeline.data.loading import files_by_split

        groups = files_by_split(path)
        if not groups:
            problems.append(f"data.{name}={source}: no data files (jsonl / json / parquet) in the folder")
            return
        if split not in groups:
            problems.append(f"data.{name}={source}: no {split}* files (found splits: {', '.join(sorted(groups))})")
            return
        files = groups[split]
    else:
        files = [path]
    try:
        row = _first_row(files[0])
    except (ValueError, OSError) as error:
        problems.append(f"data.{name}: {files[0]} is unreadable ({str(error).splitlines()[0]})")
        return
    if row is None:
        problems.append(f"data.{name}: {files[0]} has no rows")
        return
    if not isinstance(row, dict):  # check_data_rows names rows that are not objects
        return
    if "messages" not in row and "text" not in row:
        problems.append(f"data.{name}: rows of {files[0]} need a 'messages' (chat) or 'text' column, "
                        f"found {sorted(row)}")
    missing = [column for column in columns if column not in row]
    if missing:
        problems.append(f"data.{name}: rows of {files[0]} lack {missing} (found {sorted(row)})")


def check_data_sources(cfg: RunConfig, problems: list[str]) -> None:
    data = cfg.data
    for kind in ("distill", "generic") if data.distill_on == "mix" else (data.distill_on,):
        check_data(kind, getattr(data, kind), "train", (), problems)
    check_data("sft", data.sft, "train", ("messages",), problems)
    check_data("eval", data.eval, "test", ("messages", "answer"), problems)
    if cfg.teacher.path is None and cfg.teacher.demo.generic_every and data.distill_on == "distill":
        check_data("generic", data.generic, "train", (), problems)


def teacher_tokenizer(cfg: RunConfig, source: Source | None = None, notes: list[str] | None = None):
    """The teacher's tokenizer when it is at hand without a download: the demo's char tokenizer, a local
    teacher folder's, or a GGUF teacher's (read from the file); None otherwise (an s3:// teacher's data is
    checked by the stages themselves) or when it does not load (a note in `notes`; the teacher checks and
    the teacher stage report why)."""
    if cfg.teacher.path is None:
        from pipeline.data import build_char_tokenizer

        return build_char_tokenizer()
    try:
        if is_gguf(source):
            from pipeline.model.gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(source.fetch())
        folder = Path(cfg.teacher.path.removeprefix("file://")).expanduser()
        if "://" in cfg.teacher.path.removeprefix("file://") or not folder.is_dir():
            return None
        from pipeline.stages.common import load_tokenizer

        return load_tokenizer(folder)
    except Exception as error:  # transformers raises many types for unreadable tokenizer files
        if notes is not None:
            notes.append(f"teacher.path={cfg.teacher.path}: its tokenizer does not load "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         "data rows not checked")
        return None


def check_answer_budgets(cfg: RunConfig, problems: list[str], tokenizer) -> None:
    """LOO's and the evaluation's greedy-decoding budgets against the reference replies of the very problems
    they will score (`StageData.problems`), when the teacher's tokenizer is at hand (`teacher_tokenizer`)."""
    from pipeline.data.stage_data import StageData
    from pipeline.errors import StageError

    if tokenizer is None:
        return
    checks = [(cfg.data.view("eval"), lambda data: data.eval_problems(
        cfg.evaluate.num_examples, ("evaluate.max_new_tokens", cfg.evaluate.max_new_tokens)))]
    if cfg.loo.metric == "accuracy" and not cfg.start.path:
        checks.insert(0, (cfg.data.view("eval", "distill"), lambda data: data.problems(
            data.selection_rows(), cfg.loo.num_examples, ("loo.max_new_tokens", cfg.loo.max_new_tokens))))
    for view, check in checks:
        try:
            check(StageData(view, tokenizer))
        except StageError as error:
            problems.append(str(error).splitlines()[0])
        except Exception:  # unreadable data is check_data's to report
            return


# --- data rows against the teacher's tokenizer ---------------------------------------------------

ROWS_CHECKED = 8  # the first rows of each split of each data source the run reads


@dataclass
class DataRead:
    """One data source the run reads: the data.<kind> settings naming it, its splits (in reading order)
    and the splits whose rows are scored by their answer (greedy accuracy)."""

    source: str | None  # the configured source; None = the bundled demo data
    demo_part: str  # "reasoning" or "text": what the demo data gives for it
    kinds: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    answer_splits: set[str] = field(default_factory=set)

    def label(self) -> str:
        if self.source is None:
            what = "reasoning traces" if self.demo_part == "reasoning" else "text corpus"
            return f"the bundled demo {what} ({', '.join(f'data.{kind}' for kind in self.kinds)} unset)"
        return f"{'='.join(f'data.{kind}' for kind in self.kinds)}={self.source}"


def data_reads(cfg: RunConfig, until: str = "evaluate") -> list[DataRead]:
    """Every data source (and split) the stages up to `until` read, merged by source, in stage order: the
    demo teacher's training data, LOO's rows (`pipeline.data.stage_data._selection`'s order, for local
    sources), the distillations', SFT's, the evaluation's."""
    from pipeline.chain import UNTIL

    def reaches(stage: str) -> bool:
        return UNTIL.index(until) >= UNTIL.index(stage)

    data = cfg.data
    wanted: list[tuple[str, str, bool]] = []  # (kind, split, scored by answer)
    if not cfg.teacher.path:
        wanted.append(("distill", "train", False))
        if cfg.teacher.demo.generic_every:
            wanted.append(("generic", "train", False))
    elif cfg.teacher.finetune.enabled:  # the teacher's fine-tuning reads data.sft first
        wanted.append(("sft", "train", False))
    if not cfg.start.path and reaches("loo"):
        accuracy = cfg.loo.metric == "accuracy"
        eval_splits = _local_splits(data.eval) if data.eval is not None else None
        distill_splits = _local_splits(data.distill) if data.distill is not None else None
        if data.eval is None or eval_splits is None or "validation" in eval_splits:  # (a hub name: not known here)
            wanted.append(("eval", "validation", accuracy))
        elif data.distill is None or distill_splits is None or "validation" in distill_splits:
            wanted.append(("distill", "validation", accuracy))
        else:  # LOO holds out data.distill's last train rows
            wanted.append(("distill", "train", accuracy))
    if reaches("convert"):
        wanted += [(kind, "train", False) for kind in (("distill", "generic") if data.distill_on == "mix"
                                                        else (data.distill_on,))
                   if not (kind == "generic" and data.samples_teacher)]
    if reaches("sft"):
        wanted.append(("sft", "train", False))
    if reaches("evaluate"):
        wanted.append(("eval", "test", True))
        if cfg.evaluate.generic_nll and not data.samples_teacher:  # the teacher's own samples are made by the run
            wanted.append(("generic", "test", False))
    reads: dict[tuple[str | None, str], DataRead] = {}
    for kind, split, scored in wanted:
        source, part = getattr(data, kind), "text" if kind == "generic" else "reasoning"
        if source is not None and _local_file(source) is not None:
            split = ""  # a single file is the split itself, whichever is asked for
        read = reads.setdefault((source, part if source is None else ""), DataRead(source, part))
        if kind not in read.kinds:
            read.kinds.append(kind)
        if split not in read.splits:
            read.splits.append(split)
        if scored:
            read.answer_splits.add(split)
    return list(reads.values())


def _local_file(source: str) -> Path | None:
    path = Path(source.removeprefix("file://")).expanduser()
    return path if path.is_file() else None


def _local_splits(source: str) -> dict[str, list[Path]] | None:
    """A local source's files by split (a single file: {"": [it]}, it has no other split), or None for a
    hub name."""
    from pipeline.data.loading import DataLoadError, files_by_split

    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_file():
        return {"": [path]}
    if path.is_dir():
        try:
            return files_by_split(path)
        except DataLoadError:
            return {}
    return None


def _head_rows(files: list[Path], count: int) -> list[Any]:
    """The first `count` rows of a split's files, as parsed (not necessarily objects); ValueError naming the
    file and line of a row that is not JSON."""
    rows: list[Any] = []
    for path in files:
        if len(rows) >= count:
            break
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(path).iter_batches(batch_size=count - len(rows)), None)
            rows += batch.to_pylist() if batch is not None else []
            continue
        with open(path, encoding="utf-8") as handle:
            if path.suffix.lower() == ".json" and handle.read(1) == "[":
                handle.seek(0)
                whole = json.load(handle)
                rows += whole[:count - len(rows)] if isinstance(whole, list) else [whole]
                continue
            handle.seek(0)
            for number, line in enumerate(handle, 1):
                if len(rows) >= count:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as error:
                        raise ValueError(f"line {number} of {path} is not JSON ({error})") from error
    return rows[:count]


def _refs(rows: list[tuple[str, int]]) -> str:
    """'train rows 0, 3; test row 5' for (split, index) pairs ('rows 0, 3' for a single file's)."""
    parts = []
    for split in dict.fromkeys(split for split, _ in rows):
        indexes = [str(index) for where, index in rows if where == split]
        parts.append(f"{split} row{'s' if len(indexes) > 1 else ''} {', '.join(indexes)}".lstrip())
    return "; ".join(parts)


def check_data_rows(cfg: RunConfig, problems: list[str], notes: list[str], tokenizer,
                    until: str = "evaluate") -> None:
    """The first ROWS_CHECKED rows of each split of every data source the run reads (`data_reads`), through
    the stages' own tokenisation (`tokenize_row`) with the teacher's tokenizer and chat template. One line
    per problem and source: rows that are not JSON objects; rows the tokenisation refuses (neither
    'messages' nor 'text', a template whose assistant tokens cannot be found, ...); chat rows longer than
    data.max_length whose truncation would cut assistant tokens (the end of the reply, its final answer and
    end-of-turn token, would never be trained on), a problem when more than MAX_CUT_SHARE of the checked
    rows are (with 8 rows: any), with the length they need; scored rows without an integer 'answer'.
    Plain-text rows longer than data.max_length are only a note: cutting pre-training-like text to its
    first tokens is the usual practice. Sources already reported by `check_data`, and hub datasets (no
    download here), are left to it and to the stages."""
    from pipeline.data.answers import reference_answer
    from pipeline.data.loading import DataLoadError, has_generation_markers, tokenize_row
    from pipeline.data.stage_data import MAX_CUT_SHARE, StageData

    if tokenizer is None:
        return
    max_length, facts = cfg.data.max_length, []
    for read in data_reads(cfg, until):
        label = read.label()
        if any(problem.startswith(f"data.{kind}") for kind in read.kinds for problem in problems):
            continue  # check_data found it unusable already
        rows: list[tuple[str, int, Any]] = []
        try:
            if read.source is None:
                for split in read.splits:
                    kind = read.kinds[0]
                    head = StageData(cfg.data.view(kind), tokenizer).rows(kind, split)
                    rows += [(split, index, head[index]) for index in range(min(ROWS_CHECKED, len(head)))]
            else:
                splits = _local_splits(read.source)
                if splits is None:
                    notes.append(f"{label}: a hub dataset; its rows are checked when a stage loads it")
                    continue
                for split in read.splits:
                    rows += [(split, index, row) for index, row in
                             enumerate(_head_rows(splits.get(split, []), ROWS_CHECKED))]
        except (ValueError, OSError) as error:
            problems.append(f"{label}: {str(error).splitlines()[0]}")
            continue
        not_objects = [(split, index, row) for split, index, row in rows if not isinstance(row, dict)]
        if not_objects:
            kinds = sorted({type(row).__name__ for _, _, row in not_objects})
            problems.append(f"{label}: {_refs([(s, i) for s, i, _ in not_objects])} of the first {ROWS_CHECKED} "
                            f"are not JSON objects ({', '.join(kinds)}): every row must be an object with "
                            f"'messages' (chat) or 'text'")
        failed, lengths, cut, truncated = [], [], [], []
        for split, index, row in rows:
            if not isinstance(row, dict):
                continue
            try:
                ids, mask = tokenize_row(row, tokenizer, index)
            except DataLoadError as error:
                failed.append((split, str(error).splitlines()[0]))
                continue
            lengths.append(len(ids))
            if len(ids) > max_length:
                (cut if any(mask[max_length:]) and row.get("messages") is not None else truncated).append(len(ids))
        if failed:
            split, message = failed[0]
            more = f" ({len(failed)} of the {len(rows)} rows checked fail)" if len(failed) > 1 else ""
            problems.append(f"{label}{f' {split} split' if split else ''}: {message}{more}")
        if lengths and len(cut) > MAX_CUT_SHARE * len(lengths):
            problems.append(
                f"{label}: {len(cut)} of the {len(lengths)} chat rows checked are longer than data.max_length="
                f"{max_length} with the teacher's tokenizer (up to {max(cut)} tokens), so truncation would cut "
                f"their assistant replies (their end and end-of-turn token never trained on); set data.max_length "
                f"to at least {max(lengths)}")
        elif cut or truncated:
            notes.append(f"{label}: {len(cut) + len(truncated)} of the {len(lengths)} rows checked are longer than "
                         f"data.max_length={max_length} (up to {max(cut + truncated)} tokens) and will be truncated "
                         f"to their first {max_length} tokens")
        scored = [(split, index, row) for split, index, row in rows
                  if split in read.answer_splits and isinstance(row, dict)]
        not_chat = [(split, index) for split, index, row in scored if row.get("messages") is None]
        if not_chat:
            problems.append(f"{label}: {_refs(not_chat)} of the first {ROWS_CHECKED} are not chat rows ('messages'): "
                            f"scored rows are prompted through the chat template")
        missing = [(split, index) for split, index, row in scored if row.get("answer") in (None, "")]
        if missing:
            problems.append(f"{label}: {_refs(missing)} of the first {ROWS_CHECKED} have no 'answer' (scored rows "
                            f"need the reference answer the generated one is checked against)")
        for split, index, row in scored:
            if row.get("answer") not in (None, ""):
                try:
                    reference_answer(row["answer"])
                except ValueError as error:
                    problems.append(f"{label}{f' {split} split' if split else ''}: row {index}: {error} (answers are "
                                    f"checked as integers)")
                    break
        if lengths:
            splits = f" {'/'.join(read.splits)}" if read.splits != [""] else ""
            facts.append(f"{label}{splits}: {len(lengths)} rows, {min(lengths)}-{max(lengths)} tokens")
    if facts:
        how = ("no chat template" if not tokenizer.chat_template else "its {% generation %} markers"
               if has_generation_markers(tokenizer)
               else "rendering each conversation turn by turn (the template has no {% generation %} markers)")
        notes.append(f"data rows checked with the teacher's tokenizer (the first {ROWS_CHECKED} of each split; "
                     f"assistant tokens from {how}; data.max_length={max_length}): {'; '.join(facts)}")


def check_lm_eval(cfg: RunConfig, problems: list[str]) -> None:
    """lm-eval installed and its tasks known, when the evaluation asks for any."""
    from pipeline.evaluate.lm_harness import LMEvalError, check_tasks

    try:
        check_tasks(cfg.evaluate.lm_eval)
    except LMEvalError as error:
        problems.append(str(error).splitlines()[0])


def check_device(cfg: RunConfig, problems: list[str], notes: list[str]) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.hardware.device == "cuda" and not cuda:
        problems.append("hardware.device=cuda but no CUDA device is available (hardware=cpu runs on the CPU)")
        return
    if cfg.hardware.nproc > 1:
        notes.append(f"training under torchrun: {cfg.hardware.nproc} processes a node, {cfg.hardware.nnodes} node(s)")
    if cfg.hardware.device == "cpu" or not cuda:
        notes.append("device: cpu (pure-PyTorch reference kernels)")
        return
    if cfg.hardware.nproc > 1 and cfg.hardware.nproc > torch.cuda.device_count():
        problems.append(f"hardware.nproc={cfg.hardware.nproc} but this machine has {torch.cuda.device_count()} CUDA "
                        "device(s) (one training process a GPU)")
    from pipeline.model import kernels

    mode = kernels.kernel_mode()
    missing = [reason for functions, reason in (kernels._mamba_ssm(), kernels._causal_conv1d()) if functions is None]
    if missing and mode != "reference":
        problems.append(f"CUDA device without the Mamba kernels ({'; '.join(missing)}): install "
                        "'hybrid-distill[gpu]', or set HYBRID_KERNELS=reference to run the slow reference")
    else:
        notes.append(f"device: cuda ({torch.cuda.get_device_name()}), kernels: "
                     f"{'reference' if mode == 'reference' else 'mamba_ssm + causal_conv1d'}")
    if "gdn" in cfg.schedule.mixers and mode != "reference" and kernels._fla()[0] is None:
        problems.append(f"schedule.mixers lists gdn on a CUDA device without the Gated DeltaNet kernels "
                        f"({kernels._fla()[1]}): install fla-core (DEVELOPERS.md), or set HYBRID_KERNELS=reference "
                        "to run the slow reference")


def check_precision(cfg: RunConfig, problems: list[str], notes: list[str]) -> None:
    """hardware.precision as the stages will resolve it. bf16-mixed runs on the CPU too (CPU autocast: the
    same fp32 master weights, slower than fp32 on most CPUs); on CUDA it needs a device with bf16."""
    import torch

    cuda = torch.cuda.is_available() and cfg.hardware.device != "cpu"
    precision = cfg.hardware.precision
    if precision == "auto":
        precision = "bf16-mixed" if cuda else "fp32"
    if precision == "bf16-mixed" and cuda and not torch.cuda.is_bf16_supported():
        problems.append(f"hardware.precision={cfg.hardware.precision} needs bf16, which this CUDA device "
                        f"({torch.cuda.get_device_name()}) lacks: set hardware.precision=fp32")
        return
    notes.append("precision: " + ("bf16-mixed (fp32 master weights, bf16 compute, frozen models in bf16)"
                                  if precision == "bf16-mixed" else "fp32"))


def writable_folder(path: Path) -> str | None:
    """Why `path` (made on first use) cannot be written, or None: its nearest existing parent must be a
    writable folder on a file system mounted read-write."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
    except OSError:
        pass
    return None


def check_store(store: Store, problems: list[str], names: list[str] = ()) -> None:
    """The store can be written (a folder: its nearest existing parent is writable, and nothing the store
    did not write sits where a checkpoint of this run goes; S3: the bucket answers)."""
    try:
        if isinstance(store, LocalStore):
            why = writable_folder(store.root)
            if why:
                problems.append(f"storage.uri: {store.root} cannot be written ({why})")
            for name in names:
                store.check_place(name)
        else:
            store.check()
    except StoreError as error:
        problems.append(f"storage.uri: {str(error).splitlines()[0]}")


def check_cache(work_root: Path, problems: list[str]) -> None:
    """The local cache (work folders, downloads) can be written: storage.cache_dir."""
    why = writable_folder(work_root.parent.parent)
    if why:
        problems.append(f"storage.cache_dir: {work_root.parent.parent} cannot be written ({why})")


# --- the walk ------------------------------------------------------------------------------------------

class _Planner(Executor):
    """Walks the chain without running anything: the key and action of each call."""

    def __init__(self, store: Store, work_root: Path, rows: list[PlanRow]) -> None:
        super().__init__(store, work_root)
        self.rows = rows

    def __call__(self, call: StageCall) -> Output:
        inputs = [value.name if isinstance(value, Output) else value.uri if isinstance(value, Source)
                  else "+".join(value) for value in call.inputs.values()]
        if any(_pending(value) for value in call.inputs.values()):
            self.rows.append(PlanRow(call.name, call.stage, None, "run", inputs))
            return Output(call.name, call.stage, self.store.uri_for(call.name), "", "", "")
        key = cache_key(call)
        status = self.status(call, key)
        self.rows.append(PlanRow(call.name, call.stage, key, status, inputs))
        found = self.find(call, key, quiet=True) if status == "skip" else None
        return found or Output(call.name, call.stage, self.store.uri_for(call.name), "", "", key)


def _pending(value: Any) -> bool:
    digest = input_digest(value)
    return (not digest) if isinstance(digest, str) else any(not item for item in digest.values())


def plan(cfg: RunConfig, *, store: Store, work_root: Path, teacher: Callable[[], Source | None] | None = None,
         tracking: Callable[[], None] | None = None, until: str = "evaluate",
         start: Callable[[], Source | None] | None = None,
         chain: Callable[[Executor, Source | None, Source | None], Any] | None = None) -> Plan:
    """Checks the whole run and lists what each stage will do; writes nothing.

    chain: walks the stage calls of another flow (`chain(execute, teacher, start)`, e.g. the ablation's)
    instead of the conversion chain up to `until`.
    teacher: resolves the user's teacher (cfg.teacher.path) into a Source (a listing and digest, no
    weights downloaded); start: the same for the start checkpoint (cfg.start.path). tracking: raises if
    the tracking server cannot be reached.
    """
    from pipeline.chain import run_chain, sft_input

    result = Plan()
    problems = result.problems
    source = None
    if cfg.teacher.path and teacher is not None:
        try:
            source = teacher()
        except (ConfigError, StoreError, OSError) as error:
            message = str(error).splitlines()[0]
            problems.append(message if message.startswith("teacher.path=")
                            else f"teacher.path={cfg.teacher.path}: {message}")
    found_before = len(problems)
    shape = teacher_shape(cfg, source, problems)
    if shape is not None:
        if source is not None and len(problems) == found_before:  # its files, once its config.json is fine
            check_teacher_files(cfg, source, shape, problems)
        check_schedule_and_mamba(cfg, shape, problems)
    demo_settings = cfg.uses_demo_settings() if cfg.teacher.path else []
    if demo_settings:
        problems.append(f"teacher.path is your teacher, but {', '.join(demo_settings)} are the demo's settings "
                        "(calibrated for a 1M-parameter model trained here from scratch; lr 2e-3 diverges on a "
                        "pretrained model): use teacher=local, which selects the settings for pretrained models "
                        "(RunConfig.with_pretrained_settings() in Python), or set them")
    start_source = None
    if cfg.start.path:
        if start is None:
            problems.append(f"start.path={cfg.start.path}: no way to resolve it was given to the plan")
        else:
            try:
                start_source = start()
            except (ConfigError, StoreError, OSError) as error:
                message = str(error).splitlines()[0]
                problems.append(message if message.startswith("start.path=")
                                else f"start.path={cfg.start.path}: {message}")
        if start_source is not None:
            check_start(cfg, start_source, shape, problems)
    elif source is not None and shape is not None and not is_gguf(source):  # a hybrid teacher: the first conversion adds to its Mamba
        found = read_config(f"teacher.path={cfg.teacher.path}", source, problems)
        teacher_mamba = mamba_count(f"teacher.path={cfg.teacher.path}", *found, problems) if found else None
        if teacher_mamba and cfg.schedule.counts[0] <= teacher_mamba:
            problems.append(f"schedule.counts {list(cfg.schedule.counts)}: teacher.path={cfg.teacher.path} already "
                            f"has {teacher_mamba} Mamba layers; every count must be larger (or give it as "
                            "start.path to continue its conversion)")
    check_data_sources(cfg, problems)
    tokenizer = teacher_tokenizer(cfg, source, result.notes)
    check_data_rows(cfg, problems, result.notes, tokenizer, until="evaluate" if chain is not None else until)
    if not problems:
        check_answer_budgets(cfg, problems, tokenizer)
    try:
        sft_input(cfg)
    except ConfigError as error:
        problems.append(str(error))
    if until == "evaluate":
        check_lm_eval(cfg, problems)
    check_device(cfg, problems, result.notes)
    check_precision(cfg, problems, result.notes)
    check_cache(work_root, problems)
    if tracking is not None:
        try:
            tracking()
        except Exception as error:  # any failure to reach it is the user's to fix, in one line
            problems.append(f"tracking.uri: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    if not problems or ((cfg.teacher.path is None or source is not None)
                        and (cfg.start.path is None or start_source is not None)):
        try:
            planner = _Planner(store, work_root, result.rows)
            if chain is None:
                run_chain(cfg, planner, source, until=until, start=start_source)
            else:
                chain(planner, source, start_source)
        except (ConfigError, StoreError) as error:
            message = str(error).splitlines()[0]
            if message not in problems:
                problems.append(message)
    check_store(store, problems, [row.name for row in result.rows if row.status != "skip"])
    return result


__all__ = ["Plan", "PlanError", "PlanRow", "ROWS_CHECKED", "SUPPORTED_ARCHITECTURES", "check_data_rows", "data_reads",
           "plan"]
