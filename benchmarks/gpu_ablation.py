"""The ablation flow bare: `pipeline.ablation.run_ablation` through the one executor over a folder store, then
the same report as `python -m flows.ablation` (no Prefect, MLflow or Hydra: a GPU machine has only
`pipeline`'s own dependencies). The preset is read by `pipeline.presets` as Hydra would compose it.

    python benchmarks/gpu_ablation.py --experiment smollm2_ablation --root /tmp/abl --results-dir $OUT
    python benchmarks/gpu_ablation.py --experiment smollm2_ablation --root /tmp/abl --plan    (check, list, run nothing)
    python benchmarks/gpu_ablation.py --experiment tiny --root /tmp/abl ablation.seeds=[0] hardware.device=cpu

Resumable in parts: everything goes to `<root>/<run_name>` (the store) and `<root>/.cache/work/` (the stages'
saved training state and finished MMR / KL trials), so running the same command again skips every
completed stage and continues a killed one from its last save. `--deadline-s S` starts no new stage
computation after S seconds (exit code 3: "run again"); wrap the command in `timeout` for a hard limit
(a stage killed there resumes from its saved state). The report (<ablation.report_name>-<device>.json / .md /
.png) is written when every stage is complete, into `--results-dir` (default `ablation.results_dir`).

`--parallel N`: one process per seed (seed i on GPU i mod N, CUDA_VISIBLE_DEVICES) on the same store
(the first computes the teacher, its fine-tuning, the samples and LOO; the others wait on the store's
leases), then this process writes the report of all seeds. Stage timings (seconds per call, computed or
found) are appended to `<results-dir>/<report_name>-stages.jsonl`.

Overrides are `key=value` with YAML values (`ablation.seeds=[0]`, `train.steps=20`), applied to the preset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError, RunConfig  # noqa: E402  (no torch)
from pipeline.presets import merge, preset_config  # noqa: E402

DEADLINE_EXIT = 3  # the deadline stopped the run before a stage: run the same command again


class Deadline(Exception):
    """No new stage computation after the deadline."""


def parse_overrides(items: list[str]) -> dict:
    """`a.b=value` strings -> nested changes for `pipeline.presets.merge` (values read as YAML)."""
    import yaml

    changes: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = changes
        *parents, name = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = yaml.safe_load(value)
    return changes


def build_config(experiment: str | None, overrides: list[str], seeds: list[int] | None = None) -> RunConfig:
    cfg = merge(preset_config(experiment), parse_overrides(overrides))
    if seeds is not None:
        cfg = merge(cfg, {"ablation": {"seeds": seeds}})
    return cfg


def open_run_store(cfg: RunConfig, root: Path):
    from pipeline.store import open_store

    store = open_store(str(root / cfg.run_name), cache_dir=root / ".cache" / "store")
    store.lease_wait_seconds = cfg.ablation.lease_wait_s
    return store


def teacher_source(cfg: RunConfig):
    from pipeline.chain import local_teacher_source

    return local_teacher_source(cfg.teacher.path) if cfg.teacher.path else None


def work_root(cfg: RunConfig, root: Path, store) -> Path:
    """The stages' work folders, as `run_local` places them under the cache root `<root>/.cache`."""
    from pipeline.executor import work_root_for

    return work_root_for(root / ".cache", store, cfg.run_name)


def check(cfg: RunConfig, root: Path, source):
    from pipeline.ablation import check_schedule, run_ablation
    from pipeline.plan import Plan, plan

    try:
        check_schedule(cfg)
    except ConfigError as error:
        return Plan(problems=[str(error)])
    store = open_run_store(cfg, root)
    return plan(cfg, store=store, work_root=work_root(cfg, root, store),
                teacher=lambda: source, until="steps",
                chain=lambda execute, teacher, _start: run_ablation(cfg, execute, teacher))


def run(cfg: RunConfig, root: Path, results_dir: Path, command: str, deadline_s: float | None) -> dict:
    """Every stage call (computing what the store lacks), then the report; returns its paths and counts."""
    from pipeline.ablation import collect_records, report_settings, run_ablation, write_report
    from pipeline.executor import Executor

    started = time.perf_counter()
    store = open_run_store(cfg, root)
    timings = results_dir / f"{cfg.ablation.report_name}-stages.jsonl"
    results_dir.mkdir(parents=True, exist_ok=True)

    class TimedExecutor(Executor):
        def dispatch(self, call, key):
            begun = time.perf_counter()
            if deadline_s is not None and begun - started > deadline_s and self.find(call, key, quiet=True) is None:
                raise Deadline(call.name)
            output = super().dispatch(call, key)
            with open(timings, "a") as handle:
                handle.write(json.dumps({"name": call.name, "stage": call.stage, "ran": output.ran,
                                         "seconds": round(time.perf_counter() - begun, 2), "pid": os.getpid(),
                                         "at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                             timespec="seconds")}) + "\n")
            return output

    executor = TimedExecutor(store, work_root(cfg, root, store))
    results = run_ablation(cfg, executor, teacher_source(cfg))
    teacher, records = collect_records(results, lambda output: store.get_checkpoint(output.name))
    computed = max(store.manifest(result.quality.name)["created"] for result in results)
    paths = write_report(teacher, records, results_dir, command=command,
                         date=str(computed)[:19].replace("T", " ") + " UTC", settings=report_settings(cfg),
                         name=cfg.ablation.report_name)
    return {"paths": {kind: str(path) for kind, path in paths.items()}, "ran": executor.ran,
            "skipped": executor.skipped, "seconds": round(time.perf_counter() - started, 1)}


def parallel(args, cfg: RunConfig, command: str) -> int:
    """One child process per seed, each on its own GPU; then the report of all of them (here)."""
    started = time.perf_counter()
    logs = Path(args.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index, seed in enumerate(cfg.ablation.seeds):
        child = [sys.executable, __file__, "--experiment", args.experiment, "--root", args.root, "--results-dir",
                 str(args.results_dir or cfg.ablation.results_dir), f"--seeds={seed}", *args.overrides]
        if args.deadline_s is not None:
            child += ["--deadline-s", str(args.deadline_s)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=str(index % args.parallel))
        log = open(logs / f"seed-{seed}.log", "a")
        children.append((seed, subprocess.Popen(child, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        print(f"seed {seed}: GPU {index % args.parallel}, log {logs / f'seed-{seed}.log'}", flush=True)
    codes = {}
    # a `timeout` (SIGTERM) of this process stops the seeds' processes too (their stages resume next time)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        for seed, process, log in children:
            codes[seed] = process.wait()
            log.close()
            print(f"seed {seed}: exit {codes[seed]} at +{time.perf_counter() - started:.0f}s", flush=True)
    finally:
        for _, process, _ in children:
            if process.poll() is None:
                process.terminate()
        for _, process, _ in children:
            process.wait()
    if any(codes.values()):
        for seed, code in codes.items():
            if code not in (0, DEADLINE_EXIT):
                print(f"--- last lines of seed {seed}'s log", flush=True)
                print("\n".join((logs / f"seed-{seed}.log").read_text().splitlines()[-20:]), flush=True)
        return DEADLINE_EXIT if set(codes.values()) <= {0, DEADLINE_EXIT} else 1
    return finish(cfg, args, command)


def finish(cfg: RunConfig, args, command: str) -> int:
    results_dir = Path(args.results_dir or cfg.ablation.results_dir)
    try:
        done = run(cfg, Path(args.root), results_dir, command, args.deadline_s)
    except Deadline as stopped:
        print(f"deadline: stopped before {stopped} (run the same command again to continue)", flush=True)
        return DEADLINE_EXIT
    print(f"done in {done['seconds']} s: {len(done['ran'])} stages computed, {len(done['skipped'])} found complete",
          flush=True)
    print(Path(done["paths"]["md"]).read_text().split("\n## Differences")[0], flush=True)
    print(f"report: {', '.join(done['paths'].values())}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_ablation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="smollm2_ablation")
    parser.add_argument("--root", default="/tmp/gpu-ablation", help="the store and work folders")
    parser.add_argument("--results-dir", default=None, help="where the report goes (default ablation.results_dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="ablation.seeds (default the preset's)")
    parser.add_argument("--parallel", type=int, default=0, help="one process per seed over this many GPUs")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no stage computation after this")
    parser.add_argument("--plan", action="store_true", help="check everything, list every stage call, run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value (YAML values)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/gpu_ablation.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        cfg = build_config(args.experiment, args.overrides, args.seeds)
        source = teacher_source(cfg)
        checked = check(cfg, Path(args.root), source)
    except ConfigError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.plan:
        print(checked.render())
    for problem in checked.problems:
        print(f"error: {problem}", file=sys.stderr)
    if args.plan or checked.problems:
        return 1 if checked.problems else 0
    if args.parallel > 0 and len(cfg.ablation.seeds) > 1:
        return parallel(args, cfg, command)
    return finish(cfg, args, command)


if __name__ == "__main__":
    sys.exit(main())
