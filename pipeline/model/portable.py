"""Self-contained checkpoints: the modeling code written beside the weights, with an `auto_map`.

`write_modeling_code(folder)` copies the modules `HybridForCausalLM` is built from (the closure of
`pipeline.model.modeling`'s imports inside `pipeline.model`) into the checkpoint folder under names of
their own, rewrites their imports to relative ones (transformers copies a remote-code module together
with the files it imports relatively), and adds `auto_map` to config.json, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the hybrid on a machine where this package is not installed (torch and transformers suffice).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

PACKAGE = "pipeline.model"
ROOT_MODULE = "modeling"
PREFIX = "hybrid_"  # pipeline/model/config.py -> hybrid_config.py in the checkpoint


class PortableCodeError(RuntimeError):
    """The modeling code imports something that cannot travel with a checkpoint."""


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _local_imports(source: str, module: str) -> set[str]:
    """Sibling modules of pipeline.model that `source` imports; an import of other project code is an error."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                found.update(alias.name for alias in node.names)
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module.split(".")[2])
            elif node.module == "pipeline" or node.module.startswith("pipeline."):
                raise PortableCodeError(f"pipeline/model/{module}.py imports {node.module}, which a self-contained "
                                        "checkpoint cannot carry")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "pipeline" or alias.name.startswith("pipeline."):
                    raise PortableCodeError(f"pipeline/model/{module}.py imports {alias.name}, which a "
                                            "self-contained checkpoint cannot carry")
    return found


def module_closure() -> list[str]:
    """Every pipeline.model module the modeling code needs, the root first."""
    order, todo = [], [ROOT_MODULE]
    while todo:
        module = todo.pop(0)
        if module in order:
            continue
        order.append(module)
        todo.extend(sorted(_local_imports((_package_dir() / f"{module}.py").read_text(), module)))
    return order


def _rewrite(source: str, modules: list[str]) -> str:
    """Absolute imports of sibling modules -> relative ones under the checkpoint's file names."""
    def from_module(match: re.Match) -> str:
        return f"{match.group(1)}from .{PREFIX}{match.group(2)} import"

    source = re.sub(rf"^(\s*)from {re.escape(PACKAGE)}\.(\w+) import", from_module, source, flags=re.MULTILINE)

    def package_import(match: re.Match) -> str:
        indent, names = match.group(1), [name.strip() for name in match.group(2).split(",")]
        lines = []
        for name in names:
            # `from . import x` is not followed by transformers' copier; `from .x import ...` is.
            lines.append(f"{indent}from . import {PREFIX}{name} as {name}")
            lines.append(f"{indent}from .{PREFIX}{name} import __name__ as _{name}_module  # noqa: F401")
        return "\n".join(lines)

    return re.sub(rf"^(\s*)from {re.escape(PACKAGE)} import ([\w, ]+)$", package_import, source, flags=re.MULTILINE)


def write_modeling_code(folder: str | Path) -> dict[str, str]:
    """Copy the modeling modules into `folder` and point config.json's auto_map at them; returns the auto_map."""
    folder = Path(folder)
    modules = module_closure()
    for module in modules:
        source = (_package_dir() / f"{module}.py").read_text()
        (folder / f"{PREFIX}{module}.py").write_text(_rewrite(source, modules))
    auto_map = {
        "AutoConfig": f"{PREFIX}config.HybridConfig",
        "AutoModelForCausalLM": f"{PREFIX}{ROOT_MODULE}.HybridForCausalLM",
    }
    config_path = folder / "config.json"
    body = json.loads(config_path.read_text())
    body["auto_map"] = auto_map
    config_path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return auto_map


__all__ = ["PortableCodeError", "module_closure", "write_modeling_code"]
