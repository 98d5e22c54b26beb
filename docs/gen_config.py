"""Generates docs/configuration.md from the config dataclasses and the conf/ groups.

    python docs/gen_config.py           # rewrite docs/configuration.md
    python docs/gen_config.py --check   # exit 1 if the page is out of date

Every key of `pipeline.config.RunConfig` (with its nested sections: `TrainConfig` from
pipeline/config/train.py, the demo's `DemoDataConfig` / `DemoTeacherConfig` from pipeline/config/demo.py) is
listed with its type (the annotation as written), its default (from a default `RunConfig()`, so default
factories are resolved) and its meaning: the comments and docstrings beside the field in the source, read
with `ast` / `tokenize` (nothing is imported but the config modules, which import no torch). Keys whose
source has no comment take their meaning from NOTES below; tests/docs/test_configuration_doc.py fails when a
key has neither, or when this page differs from what this script writes.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Meanings of fields the source leaves without a comment (appended after the source's comment where it has
# one). Keyed by class name and field name.
NOTES: dict[tuple[str, str], str] = {
    ("RunConfig", "run_name"): "the run's name: the store prefix `<storage.uri>/<run_name>/`, the MLflow parent "
                               "run and the work folder; one path segment (letters, digits, `.`, `_`, `-`)",
    ("RunConfig", "seed"): "the distillation seed: Mamba initialisation (`pipeline.convert.mixer_generator`), "
                           "data order, MMR and KL trials",
    ("RunConfig", "teacher"): "the teacher (section below)",
    ("RunConfig", "start"): "a hybrid to continue from (section below)",
    ("RunConfig", "data"): "data sources (section below)",
    ("RunConfig", "mamba"): "settings of new Mamba-1 mixers (read by the first conversion)",
    ("RunConfig", "gdn"): "settings of new Gated DeltaNet mixers",
    ("RunConfig", "schedule"): "the conversion schedule",
    ("RunConfig", "loo"): "leave-one-out layer importance",
    ("RunConfig", "mmr"): "MMR scoring of the remaining attention layers",
    ("RunConfig", "sft"): "the final SFT",
    ("RunConfig", "evaluate"): "the evaluation of the teacher and every checkpoint",
    ("RunConfig", "storage"): "where checkpoints go",
    ("RunConfig", "tracking"): "MLflow",
    ("RunConfig", "hardware"): "device, precision, processes",
    ("RunConfig", "ablation"): "`python -m flows.ablation` only",
    ("TeacherConfig", "demo"): "the demo teacher's size and training (used when `path` is null)",
    ("TeacherConfig", "finetune"): "optional SFT of your teacher before anything else",
    ("TeacherFinetuneConfig", "train"): "its training settings (a TrainConfig; loss must be `ce`)",
    ("DataConfig", "max_length"): "tokens per row: chat rows longer are refused by the plan, plain rows cut to it",
    ("DataConfig", "demo"): "the bundled demo data generator (used for every source left null)",
    ("DataConfig", "samples"): "the teacher's own samples, read when `data.generic=teacher`",
    ("SamplesConfig", "validation"): "validation rows",
    ("SamplesConfig", "test"): "test rows (>= 1: the evaluation scores them)",
    ("SamplesConfig", "max_new_tokens"): "tokens sampled per row",
    ("SamplesConfig", "temperature"): "sampling temperature",
    ("SamplesConfig", "batch_size"): "rows generated per batch",
    ("SamplesConfig", "seed"): "seed of the sampling (a CPU generator)",
    ("MambaConfig", "d_state"): "SSM state size per channel (B and C are grouped in chunks of d_state)",
    ("MambaConfig", "dt_rank"): "rank of the dt projection (the vLLM plugin needs ceil(hidden_size / 16))",
    ("MambaConfig", "d_conv"): "width of the causal conv over x",
    ("LOOConfig", "batch_size"): "rows per forward",
    ("SFTConfig", "train"): "its training settings (a TrainConfig; loss must be `ce`)",
    ("EvaluateConfig", "batch_size"): "problems decoded per batch",
    ("EvaluateConfig", "max_new_tokens"): "greedy decoding budget per problem",
    ("EvaluateConfig", "nll_examples"): "test rows for NLL and KL to the teacher (per assistant token)",
    ("EvaluateConfig", "throughput_prompt"): "see throughput_batch",
    ("EvaluateConfig", "throughput_new_tokens"): "see throughput_batch",
    ("EvaluateConfig", "throughput_repeats"): "see throughput_batch",
    ("EvaluateConfig", "lm_eval"): "lm-evaluation-harness tasks (section below)",
    ("LMEvalConfig", "batch_size"): "lm-eval's batch size",
    ("HardwareConfig", "rdzv_endpoint"): "host:port of the c10d rendezvous (needed when nnodes > 1; see nnodes)",
    ("TrackingConfig", "experiment"): "the MLflow experiment name",
    ("TrackingConfig", "enabled"): "false: no MLflow (checkpoints and their stage.json still carry every metric)",
    ("TrainConfig", "warmup_steps"): "linear warm-up steps, then a cosine down to lr x min_lr_ratio",
    ("TrainConfig", "betas"): "AdamW betas",
    ("DemoDataConfig", "seed"): "seed of the generator (both the reasoning traces and the generic text)",
    ("DemoDataConfig", "n_train"): "training problems",
    ("DemoDataConfig", "n_validation"): "validation problems",
    ("DemoDataConfig", "n_test"): "test problems",
    ("DemoDataConfig", "min_ops"): "fewest additions / subtractions per problem",
    ("DemoDataConfig", "max_ops"): "most additions / subtractions per problem",
    ("DemoDataConfig", "min_operand"): "smallest operand",
    ("DemoDataConfig", "max_operand"): "largest operand",
    ("DemoDataConfig", "max_value"): "every intermediate result stays in [0, max_value]",
    ("DemoDataConfig", "n_text_train"): "generic-text training rows",
    ("DemoDataConfig", "n_text_validation"): "generic-text validation rows",
    ("DemoDataConfig", "n_text_test"): "generic-text test rows",
    ("DemoDataConfig", "min_sentences"): "fewest sentences per generic-text row",
    ("DemoDataConfig", "max_sentences"): "most sentences per generic-text row",
    ("DemoTeacherConfig", "hidden_size"): "model width (the fields map 1:1 onto transformers' LlamaConfig)",
    ("DemoTeacherConfig", "num_hidden_layers"): "decoder layers",
    ("DemoTeacherConfig", "num_attention_heads"): "query heads",
    ("DemoTeacherConfig", "num_key_value_heads"): "KV heads (GQA)",
    ("DemoTeacherConfig", "intermediate_size"): "MLP width",
    ("DemoTeacherConfig", "max_position_embeddings"): "longest sequence",
    ("DemoTeacherConfig", "rope_theta"): "RoPE base",
    ("DemoTeacherConfig", "rms_norm_eps"): "RMSNorm epsilon",
    ("DemoTeacherConfig", "tie_word_embeddings"): "tie the lm_head to the embeddings",
}

# The modules whose dataclasses make up RunConfig.
SOURCES = ("pipeline/config/__init__.py", "pipeline/config/train.py", "pipeline/config/demo.py")
# TrainConfig sections, documented once as a shape, with each location's defaults in one matrix.
TRAIN_LOCATIONS = ("train", "mmr.train", "sft.train", "teacher.demo.train", "teacher.finetune.train")
# A trailing comment on a line this long, followed by comment lines and then a field with a trailing comment
# of its own, is continued by those lines (otherwise comment lines above a field are that field's).
WRAP_LINE = 100


@dataclasses.dataclass
class FieldDoc:
    name: str
    annotation: str
    doc: str


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text, whether the line holds only the comment)."""
    out: dict[int, tuple[str, bool]] = {}
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            text = token.string.lstrip("#").strip()
            out[row] = (text, not lines[row - 1][:col].strip())
    return out


def _join(parts: list[str]) -> str:
    return " ".join(part for part in parts if part).strip()


def class_docs(path: Path) -> dict[str, tuple[str, list[FieldDoc]]]:
    """For each class of the module: (its docstring, its annotated fields with their comments)."""
    source = path.read_text()
    lines = source.splitlines()
    comments = _comments(source)
    out: dict[str, tuple[str, list[FieldDoc]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docstring = " ".join((ast.get_docstring(node) or "").split())
        fields = [stmt for stmt in node.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)]
        docs: list[FieldDoc] = []
        for index, stmt in enumerate(fields):
            trailing = [comments[row][0] for row in range(stmt.lineno, stmt.end_lineno + 1)
                        if row in comments and not comments[row][1]]
            leading: list[str] = []
            row = stmt.lineno - 1
            while row in comments and comments[row][1]:
                leading.insert(0, comments[row][0])
                row -= 1
            previous = fields[index - 1] if index else None
            if previous is not None and leading and row == previous.end_lineno:
                prev_trailing = any(r in comments and not comments[r][1]
                                    for r in range(previous.lineno, previous.end_lineno + 1))
                own_trailing = bool(trailing)
                if prev_trailing and own_trailing and len(lines[previous.end_lineno - 1]) >= WRAP_LINE:
                    docs[-1].doc = _join([docs[-1].doc, *leading])  # the previous field's comment, continued
                    leading = []
            follow: list[str] = []
            if index == len(fields) - 1 and trailing and len(lines[stmt.end_lineno - 1]) >= WRAP_LINE:
                row = stmt.end_lineno + 1
                while row in comments and comments[row][1]:
                    follow.append(comments[row][0])
                    row += 1
            docs.append(FieldDoc(stmt.target.id, ast.unparse(stmt.annotation), _join([*leading, *trailing, *follow])))
        out[node.name] = (docstring, docs)
    return out


def all_class_docs() -> dict[str, tuple[str, list[FieldDoc]]]:
    out: dict[str, tuple[str, list[FieldDoc]]] = {}
    for relative in SOURCES:
        out.update(class_docs(ROOT / relative))
    return out


def meaning(cls_name: str, field: FieldDoc) -> str:
    extra = NOTES.get((cls_name, field.name), "")
    return _join([field.doc + (";" if field.doc and extra else ""), extra])


def value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(item) for item in value) + "]"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _key_note(field: dataclasses.Field) -> str:
    from pipeline.config import KEY_NEUTRAL, KEY_SINCE

    if field.metadata.get(KEY_NEUTRAL):
        return "not in keys"
    if field.metadata.get(KEY_SINCE):
        return "in keys unless default"
    return ""


def _sections(cls: type, obj: Any, prefix: str, docs: dict, out: list) -> None:
    """Depth first: (dotted prefix, class, instance) for every config section below RunConfig."""
    from pipeline.config.train import TrainConfig

    out.append((prefix, cls, obj))
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        sub = hints[field.name]
        if dataclasses.is_dataclass(sub) and sub is not TrainConfig:
            _sections(sub, getattr(obj, field.name), f"{prefix}{field.name}.", docs, out)


def leaf_keys() -> list[str]:
    """Every dotted key of RunConfig (TrainConfig sections expanded), as a user overrides it."""
    from pipeline.config import RunConfig, to_plain

    keys: list[str] = []

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")
        else:
            keys.append(prefix[:-1])

    walk(to_plain(RunConfig()), "")
    return keys


def _section_table(cls: type, obj: Any, prefix: str, docs: dict) -> list[str]:
    from pipeline.config.train import TrainConfig

    rows = ["| key | type | default | meaning | cache key |", "| --- | --- | --- | --- | --- |"]
    by_name = {field.name: field for field in docs[cls.__name__][1]}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        doc = by_name[field.name]
        sub = hints[field.name]
        if sub is TrainConfig:
            default = "a TrainConfig (defaults below)"
        elif dataclasses.is_dataclass(sub):
            default = f"section `{prefix}{field.name}`"
        else:
            default = f"`{value_text(getattr(obj, field.name))}`"
        rows.append(f"| `{prefix}{field.name}` | `{_cell(doc.annotation)}` | {_cell(default)} | "
                    f"{_cell(meaning(cls.__name__, doc))} | {_key_note(field)} |")
    return rows


def _train_matrix(docs: dict) -> list[str]:
    from pipeline.config import RunConfig, pretrained_distill, pretrained_mmr, pretrained_sft
    from pipeline.config.train import TrainConfig

    run = RunConfig()
    columns = [(location, _get(run, location)) for location in TRAIN_LOCATIONS]
    columns += [("pretrained train", pretrained_distill()), ("pretrained mmr.train", pretrained_mmr()),
                ("pretrained sft.train", pretrained_sft())]
    rows = ["| field | type | meaning | cache key | dataclass default | "
            + " | ".join(f"`{name}`" if not name.startswith("pretrained") else name for name, _ in columns) + " |",
            "| --- " * (5 + len(columns)) + "|"]
    by_name = {field.name: field for field in docs["TrainConfig"][1]}
    for field in dataclasses.fields(TrainConfig):
        doc = by_name[field.name]
        values = [value_text(getattr(column, field.name)) for _, column in columns]
        rows.append(f"| `{field.name}` | `{_cell(doc.annotation)}` | {_cell(meaning('TrainConfig', doc))} | "
                    f"{_key_note(field)} | `{value_text(_default(field))}` | "
                    + " | ".join(f"`{value}`" for value in values) + " |")
    return rows


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --- conf/ ---------------------------------------------------------------------------------------------


def _option_comment(text: str) -> str:
    """The option file's leading comment, without `@package`; its indented example lines as code."""
    parts = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.strip().startswith("@package"):
            continue
        if body.startswith("   "):  # an example command
            example = " ".join(body.split())
            if "`" in example:  # already has its own code spans
                parts.append(example)
                continue
            if parts and parts[-1].startswith("`") and parts[-1].endswith("\\`"):
                parts[-1] = parts[-1][:-2] + " " + example + "`"  # a continued command line
            else:
                parts.append(f"`{example}`")
            continue
        parts.append(body.strip())
    return _join(parts)


def _flatten(value: Any, prefix: str, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", out)
    else:
        shown = value_text(value)
        if shown == "${required:}":
            shown = "(required)"
        out.append(f"`{prefix[:-1]}={shown}`")


def option_settings(group: str, path: Path) -> tuple[list[str], list[str]]:
    """(its defaults-list entries, the `key=value` settings it makes, as full keys)."""
    import yaml

    text = path.read_text()
    data = yaml.safe_load(text) or {}
    uses = []
    for entry in data.pop("defaults", []) or []:
        if isinstance(entry, dict):
            uses += [f"{key.removeprefix('override ').lstrip('/')}={value}" for key, value in entry.items()]
        elif entry != "_self_":
            uses.append(f"{group}={entry}")
    settings: list[str] = []
    global_package = "@package _global_" in text
    _flatten(data, "" if global_package else f"{group}.", settings)
    return uses, settings


def default_options() -> dict[str, str]:
    import yaml

    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    out = {}
    for entry in defaults:
        if isinstance(entry, dict):
            out.update({key: str(value) for key, value in entry.items()})
    return out


def conf_groups() -> list[tuple[str, list[Path]]]:
    from flows.config import GROUPS  # noqa: PLC0415 -- imports no Prefect or Hydra at module level

    return [(group, sorted((CONF / group).glob("*.yaml"))) for group in GROUPS]


def _conf_section() -> list[str]:
    defaults = default_options()
    lines = ["## Config groups (`conf/`)", "",
             "Choose an option with `group=option` (e.g. `experiment=tiny`, `hardware=cpu`, `train=forward_kl`); "
             "a wrong option prints the valid ones. `conf/config.yaml` composes them in this order, over the "
             "`RunConfig` schema (`hybrid_distill_schema`), then `experiment` last. An option's settings "
             "override the dataclass defaults above, and your `key=value` overrides win over every option. "
             "`teacher.path=...` without a `teacher=` choice selects `teacher=local` (`flows/config.py`, "
             "`with_teacher_group`). `(required)`: the option needs that key as an override.", ""]
    for group, paths in conf_groups():
        default = defaults.get(group, "")
        lines += [f"### `{group}`", "", f"Default: `{default}`." if default not in ("", "None") else
                  "Default: none.", "",
                  "| option | what it is | uses | sets |", "| --- | --- | --- | --- |"]
        for path in paths:
            uses, settings = option_settings(group, path)
            lines.append(f"| `{group}={path.stem}` | {_cell(_option_comment(path.read_text()))} | "
                         f"{', '.join(f'`{use}`' for use in uses)} | {_cell(', '.join(settings))} |")
        lines.append("")
    return lines


# --- the page -----------------------------------------------------------------------------------------


def render() -> str:
    from pipeline.config import RunConfig

    docs = all_class_docs()
    sections: list = []
    _sections(RunConfig, RunConfig(), "", docs, sections)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python docs/gen_config.py` from pipeline/config/ (__init__.py, train.py, demo.py)",
        "     and conf/; tests/docs/test_configuration_doc.py fails when it is out of date.",
        "     Do not edit by hand. -->",
        "",
        "The run configuration is one dataclass, `pipeline.config.RunConfig`; Hydra (`flows/config.py`) merges "
        "the `conf/` options and your overrides into it, and every value is type-checked and validated there "
        "before anything runs. Override any key on the command line: "
        "`make pipeline ARGS=\"schedule.counts=[4,6] train.lr=1e-3\"`, "
        "`python -m flows.convert key=value ...`, or build a `RunConfig(...)` in Python.",
        "",
        "The stable override keys are `teacher.path`, `start.path`, `schedule.counts`, `storage.uri`, "
        "`tracking.uri` and `run_name`.",
        "",
        "*cache key*: `not in keys` marks a setting that changes how fast a stage runs, never what it computes "
        "(`KEY_NEUTRAL`: left out of every cache key); `in keys unless default` a setting added after keys "
        "were first written (`KEY_SINCE`: it enters a key only when changed from its default). What enters a "
        "stage's key: [recipe.md](recipe.md#what-enters-a-stages-cache-key).",
        "",
        "Sections: " + ", ".join(f"[`{prefix[:-1] or 'top level'}`](#{_anchor(prefix[:-1] or 'top level')})"
                                 for prefix, _, _ in sections)
        + ", [`TrainConfig` (every `*.train`)](#trainconfig-every-train), [config groups](#config-groups-conf).",
        "",
    ]
    for prefix, cls, obj in sections:
        title = prefix[:-1] or "top level"
        docstring = docs[cls.__name__][0]
        lines += [f"## {title}", "", f"`{cls.__name__}`" + (f": {docstring}" if docstring else "."), ""]
        lines += _section_table(cls, obj, prefix, docs)
        lines.append("")
    train_doc = docs["TrainConfig"][0]
    lines += ["## TrainConfig (every `*.train`)", "",
              f"`TrainConfig`: {train_doc} Every training stage takes this shape, overridable the same way: "
              "`train.*` (the distillation of every conversion and step), `mmr.train.*` (each MMR and KL trial), "
              "`sft.train.*`, `teacher.demo.train.*` (the demo teacher) and `teacher.finetune.train.*`. Their "
              "defaults differ; the *pretrained* columns are what `teacher=local` (a `teacher.path`) selects "
              "(`train=pretrained`, `mmr=pretrained`, `sft=pretrained`; `pipeline.config.pretrained_distill` / "
              "`_mmr` / `_sft`), with `data.max_length=512`.", ""]
    lines += _train_matrix(docs)
    lines.append("")
    lines += _conf_section()
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading."""
    import re

    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python docs/gen_config.py")
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
