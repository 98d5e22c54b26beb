"""Load a `datasets` source and tokenise it into LM rows with loss masks.

Sources: a hub dataset name, a local jsonl/json/parquet file, a folder of such files, an ``http(s)://``
URL of one such file (credentials in the URL, ``https://user:password@host/...``, are sent as HTTP basic
auth and never reach the ``datasets`` cache), a list of files, an in-memory ``datasets.Dataset`` or a list
of dict rows. Every row must be a JSON object. Row kinds:

* ``{"messages": [...]}``: rendered with the tokenizer's chat template; loss on assistant tokens only:
  the template's ``{% generation %}`` spans where it has them, else the spans found by rendering the
  conversation turn by turn (`assistant_spans`, for released templates, which have no such markers).
* ``{"text": "..."}``: plain LM row ``bos + text + eos``; loss on every token.

The tokenised dataset has the columns ``input_ids``, ``loss_mask`` (1 = the token is a training target),
``length`` and ``source_index`` (the row's index in the loaded split).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:  # `datasets` is imported where rows are loaded, so `pipeline.data` imports without it
    import datasets

    Source = str | Path | Sequence[str | Path] | datasets.Dataset | Sequence[Mapping[str, Any]]

__all__ = [
    "DataLoadError",
    "DATA_SUFFIXES",
    "assistant_spans",
    "files_by_split",
    "has_generation_markers",
    "is_url",
    "load_rows",
    "stop_token_ids",
    "tokenize_row",
    "tokenize_rows",
    "load_tokenized",
]

# file suffix -> `datasets` builder name
DATA_SUFFIXES: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataLoadError(ValueError):
    """A data source or row that cannot be loaded or tokenised (the message names what is wrong)."""


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def is_url(text: str) -> bool:
    """An http(s) URL of a data file (read over the network, never a local path or a hub name)."""
    return str(text).lower().startswith(("http://", "https://"))


def _looks_like_path(text: str) -> bool:
    """True for strings that can only mean a local path (so a missing one is an error, not a hub name)."""
    return not is_url(text) and (
        text.startswith(("/", "./", "../", "~", "file://"))
        or Path(text).suffix.lower() in DATA_SUFFIXES
        or text.count("/") > 1
        or "\\" in text
    )


def _builder_for(files: list[Path]) -> str:
    builders = {DATA_SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in builders:
        bad = next(f for f in files if f.suffix.lower() not in DATA_SUFFIXES)
        raise DataLoadError(f"unsupported data file {str(bad)!r}: expected one of {', '.join(DATA_SUFFIXES)}")
    if len(builders) > 1:
        raise DataLoadError(f"data files mix formats ({', '.join(sorted(b for b in builders if b))}); use one format")
    return builders.pop()  # type: ignore[return-value]


# What a stored output holds beside its data (the store's manifest, a stage's records): never rows, so that a
# stage output given as data (the teacher's samples, data.generic=teacher) reads as its split files alone.
RECORD_FILES = ("manifest.json", "stage.json", "run_config.json")


def files_by_split(folder: Path) -> dict[str, list[Path]]:
    """Data files of a folder grouped by split name (file stem train/validation/test; anything else -> train),
    without the record files of a stored output (RECORD_FILES, at the folder's top)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not (p.parent == folder and p.name in RECORD_FILES))
    if not files:
        raise DataLoadError(f"folder {str(folder)!r} has no {'/'.join(DATA_SUFFIXES)} files")
    aliases = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
    groups: dict[str, list[Path]] = {}
    for f in files:
        stem = f.stem.lower()
        split = next((aliases[k] for k in aliases if stem == k or stem.startswith(k + "-") or stem.startswith(k + "_")),
                     "train")
        groups.setdefault(split, []).append(f)
    return groups


def _load_files(files: list[Path], what: str) -> datasets.Dataset:
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise DataLoadError(f"dataset {what} is empty: file {str(f)!r} has no rows")
    builder = _builder_for(files)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # datasets raises many types; give one line with the cause it wraps
        cause = err.__cause__ or err
        found = _json_row_problem(files) if builder == "json" else None
        raise DataLoadError(found or f"could not read {what}: {type(cause).__name__}: {cause}".splitlines()[0]) \
            from err
    return ds


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def _json_row_problem(files: list[Path]) -> str | None:
    """The first row of these JSON files that is not a JSON object (or a file that is not UTF-8), in one line
    naming the file and line; None otherwise (a parse error, or a failure elsewhere: datasets' message says
    it). Read only after a failed load."""
    import json

    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            return f"{str(f)!r} is not UTF-8 text ({err.reason} at byte {err.start}): JSON data files are UTF-8"
        except OSError:
            return None
        if f.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except ValueError:
                return None  # a parse error: datasets' message names it
            numbered = list(enumerate(rows, start=1))
            where = "element"
        else:
            numbered = []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    numbered.append((number, json.loads(line)))
                except ValueError:
                    return None  # a parse error: datasets' message names it
            where = "line"
        for number, row in numbered:
            if not isinstance(row, dict):
                kind = _JSON_KINDS.get(type(row), type(row).__name__)
                return (f"{str(f)!r} {where} {number} is {kind}, not a JSON object: every row must be an object "
                        "such as {\"messages\": [...]} or {\"text\": \"...\"}")
    return None


def _load_url(url: str) -> datasets.Dataset:
    """One data file at an http(s) URL: the URL's userinfo becomes HTTP basic auth (so the URL that the
    `datasets` cache records holds no password), the file's suffix names its format."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    import datasets

    from pipeline.redaction import redact_text

    shown = redact_text(url)
    parts = urlsplit(url)
    builder = DATA_SUFFIXES.get(Path(parts.path).suffix.lower())
    if builder is None:
        raise DataLoadError(f"unsupported data URL {shown!r}: its file name must end in one of "
                            f"{', '.join(DATA_SUFFIXES)}")
    storage_options = None
    if parts.username is not None or parts.password is not None:
        import aiohttp

        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        url = urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
        auth = aiohttp.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        storage_options = {"client_kwargs": {"auth": auth}}
    try:
        return datasets.load_dataset(builder, data_files=url, split="train", storage_options=storage_options)
    except Exception as err:  # datasets / fsspec / aiohttp raise many types: one line with the cause
        cause = err.__cause__ or err
        raise DataLoadError(redact_text(f"could not read {shown}: {type(cause).__name__}: {cause}".splitlines()[0])) \
            from None


def load_rows(source: Source, split: str = "train") -> datasets.Dataset:
    """Load one split of a data source as a ``datasets.Dataset``; clear errors for missing/empty sources.

    A local folder's files (searched recursively) are grouped into splits by name (``train*.jsonl``,
    ``validation*``/``val*``, ``test*``; other names count as train). A single file or list of files is
    the split itself. For the demo data, point at ``<folder>/reasoning`` or ``<folder>/text``.
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataLoadError(f"split {split!r} not found; available splits: {', '.join(source)}")
        ds = source[split]
        what = f"split {split!r}"
    elif isinstance(source, datasets.Dataset):
        ds, what = source, "in-memory dataset"
    elif isinstance(source, str) and is_url(source):
        ds, what = _load_url(source), "the data URL"
    elif isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("file://"):
            text = text[len("file://"):]
        path = Path(text).expanduser()
        if path.exists():
            if path.is_dir():
                groups = files_by_split(path)
                if split not in groups:
                    raise DataLoadError(
                        f"split {split!r} not found in folder {str(path)!r}; available splits: {', '.join(sorted(groups))}"
                    )
                ds = _load_files(groups[split], f"{str(path)!r} split {split!r}")
            else:
                ds = _load_files([path], repr(str(path)))
            what = repr(str(path))
        elif isinstance(source, Path) or _looks_like_path(text):
            raise DataLoadError(f"data path {text!r} does not exist")
        else:
            try:
                ds = datasets.load_dataset(text, split=split)
            except Exception as err:
                msg = f"could not load dataset {text!r} split {split!r} (not a local path; tried the hub): {err}"
                raise DataLoadError(msg.splitlines()[0]) from err
            what = repr(text)
    elif isinstance(source, Sequence) and source and all(isinstance(s, (str, Path)) for s in source):
        files = [Path(str(s)).expanduser() for s in source]
        for f in files:
            if not f.is_file():
                raise DataLoadError(f"data path {str(f)!r} does not exist")
        ds, what = _load_files(files, f"{len(files)} file(s)"), f"{len(files)} file(s)"
    elif isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        if not source:
            raise DataLoadError("dataset (list of rows) is empty")
        keys = list(dict.fromkeys(k for r in source for k in r))  # union of keys, first-seen order
        ds = datasets.Dataset.from_dict({k: [r.get(k) for r in source] for k in keys})
        what = "list of rows"
    else:
        raise DataLoadError(f"unsupported data source of type {type(source).__name__}")
    if len(ds) == 0:
        raise DataLoadError(f"dataset {what} is empty")
    return ds


# --------------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------------


def _row_keys(row: Mapping[str, Any]) -> list[str]:
    return sorted(k for k, v in row.items() if v is not None)


# `{% generation %}` (with optional whitespace control), as transformers looks for it
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_NO_MARKERS_FIX = "add {% generation %} ... {% endgeneration %} around the assistant content in the template"


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template marks assistant tokens itself with ``{% generation %}``."""
    template = tokenizer.get_chat_template() if tokenizer.chat_template else ""
    return bool(_GENERATION_TAG.search(template))


def _chat_messages(messages: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
    ):
        raise DataLoadError(f"row {index}: 'messages' must be a non-empty list of {{role, content}} dicts")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], index: int,
            add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises many types (raise_exception in templates, undefined names, ...)
        raise DataLoadError(f"row {index}: chat template failed: {err}".splitlines()[0]) from err


def assistant_spans(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                    index: int = 0) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and, per assistant message, (start, content_end, turn_end) in characters.

    Assistant message k's turn is what rendering ``messages[:k + 1]`` adds to rendering ``messages[:k]``
    with ``add_generation_prompt=True``: ``start`` is where that generation prompt ends (the role header
    is not the assistant's), ``content_end`` where the message's content (whitespace-stripped, as
    templates often trim it) ends, ``turn_end`` where the turn's text ends. This needs the template's
    prefix property: each such prompt is the start of the turn it prompts, and each turn's rendering the
    start of the whole conversation (a template that rewrites earlier turns as later ones come, e.g. one
    that moves the system message into the last user message, has not); and the content must appear
    verbatim in its turn. Each failure is one-line DataLoadError naming the row and the message.
    """
    full = _render(tokenizer, messages, index)
    spans: list[tuple[int, int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        where = f"row {index}: message {k} (assistant)"
        if not isinstance(message["content"], str):
            raise DataLoadError(f"{where}: content must be a string, got {type(message['content']).__name__}")
        if k == 0:
            raise DataLoadError(f"{where}: the conversation starts with an assistant message, which has no prompt "
                                f"to find its tokens after; start it with a user (or system) message, or "
                                f"{_NO_MARKERS_FIX}")
        prompt = _render(tokenizer, messages[:k], index, add_generation_prompt=True)
        turn = full if k == len(messages) - 1 else _render(tokenizer, messages[:k + 1], index)
        if not turn.startswith(prompt):
            raise DataLoadError(
                f"{where}: the chat template's generation prompt for it is not how the template starts the message "
                f"(the conversation before it, rendered with add_generation_prompt=True, is not the start of the "
                f"conversation through it), so its tokens cannot be found; {_NO_MARKERS_FIX}")
        if not full.startswith(turn):
            raise DataLoadError(
                f"{where}: the chat template renders the conversation up to this message differently once later "
                f"messages follow (it rewrites earlier turns), so assistant tokens cannot be found turn by turn; "
                f"{_NO_MARKERS_FIX}")
        content = message["content"].strip()
        found = turn.find(content, len(prompt))
        if found < 0:
            raise DataLoadError(f"{where}: the chat template does not render its content verbatim, so its tokens "
                                f"cannot be found; {_NO_MARKERS_FIX}")
        spans.append((len(prompt), found + len(content), len(turn)))
    return full, spans


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the special tokens (bos/eos/pad/... and every added token marked special, e.g. <|eot_id|>)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def _derived_mask(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                  index: int) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a chat row whose template has no ``{% generation %}`` markers.

    The ids are the one tokenisation of the whole rendered conversation without added special tokens
    (exactly what ``apply_chat_template(tokenize=True)`` gives: a bos appears where the template writes
    one). Per assistant turn (`assistant_spans`) the mask covers the tokens from the end of the generation
    prompt through the end-of-turn token: the first special token of the tokenizer that starts at or after
    the content's end within the turn (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, Mistral ``</s>``);
    text after it (ChatML's newline, the next header) is not masked. A turn without a special token after
    its content is masked up to the content's end. A token is masked when its character offsets overlap
    that span, as transformers does for ``{% generation %}`` spans: a token straddling a boundary (a
    merge of the header's last character with the content's first) is masked. Needs a fast tokenizer
    (character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataLoadError(
            f"row {index}: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, so it gives no "
            f"character offsets to find assistant tokens with; use a fast tokenizer (tokenizer.json) or "
            f"{_NO_MARKERS_FIX}")
    full, spans = assistant_spans(messages, tokenizer, index)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    special = _special_ids(tokenizer)
    mask = [0] * len(ids)
    for start, content_end, turn_end in spans:
        end = next((b for token, (a, b) in zip(ids, offsets)
                    if token in special and content_end <= a and b <= turn_end), content_end)
        for position, (a, b) in enumerate(offsets):
            if a >= end:
                break
            if b > start:
                mask[position] = 1
    return ids, mask


def tokenize_row(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, index: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one untruncated row; ``index`` is only used in error messages.

    Chat rows: with ``{% generation %}`` markers in the template, ``apply_chat_template``'s assistant mask;
    without them, the mask derived turn by turn (`_derived_mask`). Both give the same ids and mask where a
    template has markers around exactly the assistant content and its end-of-turn token.
    """
    messages = row.get("messages")
    if messages is not None:
        if not tokenizer.chat_template:
            raise DataLoadError(
                f"row {index} is a chat row ('messages') but the tokenizer has no chat template"
            )
        messages = _chat_messages(messages, index)
        if has_generation_markers(tokenizer):
            try:
                out = tokenizer.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                )
            except Exception as err:
                raise DataLoadError(f"row {index}: chat template failed: {err}".splitlines()[0]) from err
            ids = list(out["input_ids"])
            mask = [int(bool(v)) for v in out["assistant_masks"]]
        else:
            ids, mask = _derived_mask(messages, tokenizer, index)
        if any(m["role"] == "assistant" and m["content"] for m in messages) and not any(mask):
            raise DataLoadError(
                f"row {index}: the chat template's {{% generation %}} markers mark no assistant tokens"
            )
        return ids, mask
    text = row.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise DataLoadError(f"row {index}: 'text' must be a string, got {type(text).__name__}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    raise DataLoadError(f"row {index} has neither 'messages' nor 'text' (keys: {_row_keys(row)})")


_PROBE = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end an answer: the tokenizer's eos first, then the special token its chat template ends
    an assistant turn with where that is another one (Llama 3's ``<|eot_id|>`` beside its eos
    ``<|end_of_text|>``). The end of turn is the last token the assistant mask covers in a one-turn probe
    conversation (the mask `tokenize_row` trains on: content and end-of-turn token), counted only when it
    is a special token. A tokenizer without a chat template, or whose template cannot be masked, gives its
    eos alone; no eos and no such token: an empty list (generation runs to its length)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not tokenizer.chat_template:
        return stops
    try:
        ids, mask = tokenize_row({"messages": _PROBE}, tokenizer)
    except DataLoadError:
        return stops
    masked = [token for token, kept in zip(ids, mask) if kept]
    if masked and masked[-1] in _special_ids(tokenizer) and masked[-1] not in stops:
        stops.append(masked[-1])
    return stops


def tokenize_rows(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    overflow: Literal["truncate", "drop"] = "truncate",
    keep_in_memory: bool = True,
) -> datasets.Dataset:
    """Tokenise every row; rows longer than ``max_length`` are truncated (or dropped).

    Rows left without any loss token (e.g. a truncated-away answer) are dropped; if none remain it is an
    error. Output columns: input_ids, loss_mask, length, source_index.
    """
    import datasets

    if not isinstance(max_length, int) or max_length < 2:
        raise DataLoadError(f"max_length must be an int >= 2, got {max_length!r}")
    if overflow not in ("truncate", "drop"):
        raise DataLoadError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if not isinstance(dataset, datasets.Dataset):
        dataset = load_rows(dataset)  # e.g. a list of dict rows
    if len(dataset) == 0:
        raise DataLoadError("dataset is empty")
    cols = set(dataset.column_names)
    if not cols & {"messages", "text"}:
        raise DataLoadError(f"row 0 has neither 'messages' nor 'text' (keys: {_row_keys(dataset[0])})")
    if "messages" in cols and not tokenizer.chat_template:
        first = next((i for i, m in enumerate(dataset["messages"]) if m is not None), None)
        if first is not None:
            raise DataLoadError(f"row {first} is a chat row ('messages') but the tokenizer has no chat template")

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        ids, mask = tokenize_row(row, tokenizer, index)
        if len(ids) > max_length:
            if overflow == "drop":
                ids, mask = [], []
            else:
                ids, mask = ids[:max_length], mask[:max_length]
        return {"input_ids": ids, "loss_mask": mask, "length": len(ids), "source_index": index}

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "length": datasets.Value("int32"),
        "source_index": datasets.Value("int64"),
    })
    out = dataset.map(encode, with_indices=True, remove_columns=dataset.column_names, features=features,
                      keep_in_memory=keep_in_memory, desc="tokenising")
    keep = [i for i, m in enumerate(out["loss_mask"]) if any(m)]
    if not keep:
        raise DataLoadError(f"no rows left after tokenising with max_length={max_length} (every row lost its loss tokens)")
    if len(keep) < len(out):
        out = out.select(keep, keep_in_memory=keep_in_memory)
    return out


def load_tokenized(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    split: str = "train",
    *,
    overflow: Literal["truncate", "drop"] = "truncate",
) -> datasets.Dataset:
    """``load_rows`` then ``tokenize_rows``."""
    return tokenize_rows(load_rows(source, split), tokenizer, max_length, overflow=overflow)
