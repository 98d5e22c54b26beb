"""lm-evaluation-harness on our checkpoints, in-process, through its `HFLM` (an optional extra: `lm-eval`).

`evaluate.lm_eval.tasks` runs in the evaluate stage on the teacher and every checkpoint; the scores go
into `summary.json` (`lm_eval`: task -> metric -> value) and, through `score_metrics`, into MLflow under
the same names on every checkpoint (`lm_eval/<task>/<metric>[/<filter>]`), so the compare view lines
them up. Our model classes are registered with the Auto classes in this process, and the model object
itself is handed to `HFLM`, so any checkpoint the project reads (ours, Apriel-H1, MambaInLlama) is
evaluated as loaded.

On its own, over existing checkpoint folders (what `make lm-eval ARGS=...` runs):

    python -m pipeline.evaluate.lm_harness CHECKPOINT [CHECKPOINT ...] --tasks arc_easy,hellaswag [--limit 100]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

from pipeline.config import LMEvalConfig

INSTALL_HINT = "pip install -e '.[lm-eval]' (make lm-eval installs it)"


class LMEvalError(ValueError):
    """lm-eval missing, or a task it does not know: one line saying which."""


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LMEvalError(f"evaluate.lm_eval.tasks needs lm-evaluation-harness, which is not installed: "
                          f"{INSTALL_HINT}") from None


def _task_manager(cfg: LMEvalConfig):
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise LMEvalError(f"evaluate.lm_eval.include_path is not a folder: {cfg.include_path}")
    return _indexed_tasks(cfg.include_path)


@functools.lru_cache(maxsize=4)
def _indexed_tasks(include_path: str | None):
    """lm-eval's TaskManager indexes every task YAML it ships (seconds): once per process and folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(cfg: LMEvalConfig) -> None:
    """Before any model is loaded: lm-eval is installed and knows every task name."""
    if not cfg.tasks:
        return
    require_lm_eval()
    manager = _task_manager(cfg)
    unknown = [task for task in cfg.tasks if task not in manager.all_tasks]
    if unknown:
        raise LMEvalError(f"lm-eval does not know the task(s) {unknown}"
                          + (f" (include_path: {cfg.include_path})" if cfg.include_path else ""))


def scores_of(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's `results` -> task -> metric -> value, numbers only, standard errors left out.

    lm-eval names a metric "<metric>,<filter>"; the filter "none" is dropped, any other becomes a suffix:
    "exact_match,strict-match" -> "exact_match/strict-match".
    """
    scores: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}/{filter_name}"
            if not math.isnan(float(value)):
                scores.setdefault(task, {})[name] = float(value)
    return scores


def score_metrics(scores: dict[str, dict[str, float]] | None) -> dict[str, float]:
    """Flat MLflow metric names: lm_eval/<task>/<metric>."""
    return {f"lm_eval/{task}/{name}": value for task, metrics in (scores or {}).items()
            for name, value in metrics.items()}


def run_lm_eval(model, tokenizer, cfg: LMEvalConfig, *, samples: bool = False) -> dict[str, Any]:
    """Run `cfg.tasks` on `model` (already loaded, in eval mode); returns {"scores": ..., "samples": ...}."""
    require_lm_eval()
    import pipeline.model  # noqa: F401  (our classes registered with the Auto classes in this process)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size,
              max_length=cfg.max_length, device=str(device))
    output = simple_evaluate(
        model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
        apply_chat_template=cfg.apply_chat_template, task_manager=_task_manager(cfg),
        log_samples=samples, bootstrap_iters=0, verbosity="WARNING",
    )
    if output is None:  # a non-zero rank under a distributed launch
        return {"scores": {}}
    result: dict[str, Any] = {"scores": scores_of(output["results"])}
    if samples:
        result["samples"] = output.get("samples", {})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate.lm_harness",
                                     description="lm-evaluation-harness on checkpoint folders (ours, Apriel-H1, "
                                                 "MambaInLlama, or a transformers teacher)")
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--include-path", default=None, help="a folder of your own task YAML files")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)

    import torch

    from pipeline.data import load_tokenizer
    from pipeline.model.layouts import load_pretrained

    cfg = LMEvalConfig(tasks=[t for t in args.tasks.split(",") if t], limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, apply_chat_template=args.apply_chat_template,
                       include_path=args.include_path)
    try:
        check_tasks(cfg)
        missing = [path for path in args.checkpoints if not (Path(path) / "config.json").is_file()]
        if missing:
            raise LMEvalError(f"not checkpoint folders (no config.json): {missing}")
    except LMEvalError as error:
        print(f"lm-eval: {error}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for path in args.checkpoints:
        model = load_pretrained(path, dtype=dtype).to(device).eval()
        scores = run_lm_eval(model, load_tokenizer(path), cfg)["scores"]
        results[str(path)] = scores
        for name, value in sorted(score_metrics(scores).items()):
            print(f"{path}\t{name}\t{value:.4f}")
        del model
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["LMEvalError", "check_tasks", "require_lm_eval", "run_lm_eval", "score_metrics", "scores_of"]
