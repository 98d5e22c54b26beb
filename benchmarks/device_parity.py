"""Same seed, same hybrid on any device: every stage of the chain on this device against a CPU reference.

Two phases, the same code:

  reference   on the CPU (fp32): the parity chain from the committed teacher, every stage's loss curve
              (one value a step), LOO scores, the layers each conversion took, the MMR scores of every
              candidate and initialisation, the accuracies, and digests of the initial weights the seed
              gives (a conversion's new mixers and the MMR trial mixers). Written to --out (committed:
              benchmarks/results/device-parity-cpu.json).
      python benchmarks/device_parity.py reference --teacher benchmarks/parity/teacher \
          --out benchmarks/results/device-parity-cpu.json

  compare     on any device: the same chain from the same teacher, one process per variant, all at once
              (the models are tiny), then per variant and stage the largest relative difference of the
              loss curve to the reference's, the layers chosen against the reference's, the accuracies,
              and whether the initial weights are bit-identical. Writes device-parity-<device>.json/.md.
      python benchmarks/device_parity.py compare --device cuda --out-dir $OUT
              (variants: fp32 = CUDA kernels, fp32-reference = the PyTorch kernels on the GPU, bf16-mixed;
               and fp32 with --spread-seeds 1 2, whose spread over seeds 0-2 is what bf16-mixed is held to)
      python benchmarks/device_parity.py compare --device cpu --variants fp32 --spread-seeds --out-dir /tmp/x
              (the check of the check: on the reference's machine every difference must be 0)

The parity chain is the default demo (its teacher: the demo teacher as `make pipeline` trains it, committed
under benchmarks/parity/teacher because its training on another device is not bit-exact) with shorter
stages (PARITY below): 60 distillation steps a conversion, MMR trials of 40 steps with two initialisations
per candidate, 40 SFT steps, 100 evaluation problems, every step logged. CPU threads are fixed at one
(hardware.threads), so the reference reproduces to the bit on any CPU count.
Bare: needs torch, transformers, datasets, matplotlib and this package (no prefect / mlflow / hydra / boto3).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_pipeline import _merge, environment, preset_config  # noqa: E402

from pipeline.config import RunConfig  # noqa: E402

TEACHER = ROOT / "benchmarks" / "parity" / "teacher"
REFERENCE = ROOT / "benchmarks" / "results" / "device-parity-cpu.json"
PARITY = {
    "run_name": "parity",
    "hardware": {"threads": 1},
    "train": {"steps": 60, "save_every": 0, "log_every": 1},
    "mmr": {"seeds": 2, "train": {"steps": 40, "log_every": 1}},
    "sft": {"train": {"steps": 40, "save_every": 0, "log_every": 1}},
    "evaluate": {"num_examples": 100, "batch_size": 100, "nll_examples": 64, "throughput_batch": 2,
                 "throughput_prompt": 16, "throughput_new_tokens": 8, "throughput_repeats": 1},
}
# With --preset (a wiring check, e.g. tiny on a CPU in a minute): that preset's stages, with these.
SMOKE = {"run_name": "parity", "hardware": {"threads": 1}, "mmr": {"seeds": 2}}
VARIANTS = {  # name -> (precision, kernel mode)
    "fp32": ("fp32", None),
    "fp32-reference": ("fp32", "reference"),
    "bf16-mixed": ("bf16-mixed", None),
}
ACCURACY_NOISE = 0.01  # one problem of the 100: a greedy decode that float rounding flips


def chain_settings(preset: str | None) -> dict:
    """What defines the parity chain (recorded in the reference; a comparison must use the same)."""
    return {"preset": preset, "overrides": SMOKE if preset else PARITY}


def parity_config(device: str, precision: str, seed: int = 0, preset: str | None = None) -> RunConfig:
    """The parity chain for one device, precision and seed (the seed of the conversions' initialisations,
    the MMR draws and every stage's data order): the demo with PARITY, or `preset` with SMOKE."""
    cfg = _merge(preset_config(preset) if preset else RunConfig(), chain_settings(preset)["overrides"])
    return _merge(cfg, {"run_name": f"parity-{seed}", "seed": seed,
                        "hardware": {"device": device, "precision": precision},
                        "train": {"seed": seed}, "mmr": {"train": {"seed": seed}}, "sft": {"train": {"seed": seed}}})


# --- one run of the chain ------------------------------------------------------------------------

class CurveReporter:
    """Keeps one stage's `train/loss` per step and its trials' (an MMR trial: a reporter of its own)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.curve: dict[int, float] = {}
        self.trials: dict[str, CurveReporter] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train/loss" in metrics and step is not None:
            self.curve[int(step)] = float(metrics["train/loss"])

    def log_artifact(self, path) -> None:
        pass

    def progress(self, message: str) -> None:
        if "step" not in message.split(":")[0]:  # stage and trial lines; not one line a training step
            print(f"{self.prefix}{message}", flush=True)

    @contextlib.contextmanager
    def trial(self, name: str):
        child = CurveReporter(self.prefix)
        self.trials[name] = child
        yield child

    def steps(self) -> list[float]:
        return [self.curve[step] for step in sorted(self.curve)]


def run_chain(cfg: RunConfig, root: Path, teacher_folder: Path) -> dict:
    """The chain through the one executor over a folder store, the committed teacher adopted as its teacher
    output; returns every stage's record."""
    from pipeline.chain import run_chain as walk
    from pipeline.executor import Executor
    from pipeline.store import open_store

    store = open_store(str(root / cfg.run_name), cache_dir=root / ".cache" / "store")
    reporters: dict[str, CurveReporter] = {}
    kinds: dict[str, str] = {}

    class ParityExecutor(Executor):
        def dispatch(self, call, key):
            kinds[call.name] = call.stage
            if call.name == "teacher" and self.find(call, key, quiet=True) is None:
                with tempfile.TemporaryDirectory() as scratch:  # the store writes its own manifest
                    files = Path(scratch) / "teacher"
                    shutil.copytree(teacher_folder, files, ignore=shutil.ignore_patterns("manifest.json"))
                    self.store.put_checkpoint(files, "teacher", config_digest=key, metadata={
                        "stage": call.stage, "code_version": call.run.code_version, "cache_key": key})
            return super().dispatch(call, key)

        @contextlib.contextmanager
        def attempt(self, call, key):
            reporters[call.name] = CurveReporter(self.reporter.prefix)
            yield reporters[call.name], None

    executor = ParityExecutor(store, root / ".cache" / "work" / cfg.run_name, CurveReporter(f"[{cfg.run_name}] "))
    started = time.perf_counter()
    walk(cfg, executor)
    seconds = time.perf_counter() - started
    stages = {name: stage_record(store.root / name, kinds[name], reporters.get(name)) for name in kinds}
    return {"stages": stages, "seconds": round(seconds, 1)}


def stage_record(folder: Path, kind: str, reporter: CurveReporter | None) -> dict:
    """What is compared of one stage: its curve(s) and what it chose or scored."""
    meta = json.loads((folder / "stage.json").read_text())
    record: dict = {"kind": kind}
    if reporter is not None and reporter.curve:
        record["curve"] = reporter.steps()
    if kind == "teacher":
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        record["model_sha256"] = digest
    elif kind == "loo":
        table = json.loads((folder / "loo.json").read_text())
        record.update(baseline=table["baseline"], ranking=table["ranking"],
                      scores={str(entry["layer"]): entry["score"] for entry in table["layers"]})
    elif kind in ("convert", "step", "sft"):
        record.update(converted_layers=meta.get("converted_layers"), layer_pattern=meta.get("layer_pattern"),
                      final_loss=meta.get("final_distill_loss") if kind != "sft" else None)
    elif kind == "mmr":
        table = json.loads((folder / "mmr.json").read_text())
        record.update(ranking=[entry["layer"] for entry in table["ranking"]],
                      scores={str(entry["layer"]): entry["losses"] for entry in table["ranking"]})
        if reporter is not None:
            record["trials"] = {name: child.steps() for name, child in sorted(reporter.trials.items())}
    elif kind == "evaluate":
        rows = json.loads((folder / "summary.json").read_text())
        record["summary"] = {row["checkpoint"]: {key: row.get(key) for key in ("answer_accuracy", "nll",
                                                                                "kl_to_teacher")} for row in rows}
    return record


def initialisation_digests(cfg: RunConfig, teacher_folder: Path, loo_ranking: list[int]) -> dict:
    """sha256 of the initial weights the seed gives on this device: the first conversion's new mixers
    (hybridize of the teacher, as the convert stage does it) and every MMR trial mixer of its candidates
    (each draw), all in fp32, moved to the CPU to be hashed."""
    import torch

    from pipeline.convert import hybridize, mamba_trial
    from pipeline.stages.common import load_model, resolve_device
    from pipeline.stages.convert import mamba_options

    def digest(module) -> str:
        hasher = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            hasher.update(name.encode())
            hasher.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return hasher.hexdigest()

    teacher = load_model(teacher_folder, cfg.hardware, "teacher", fp32=True)
    assert next(teacher.parameters()).device.type == resolve_device(cfg.hardware).type
    layers = sorted(loo_ranking[:cfg.schedule.counts[0]])
    hybrid = hybridize(teacher, layers, seed=cfg.seed, **mamba_options(cfg.mamba))
    out = {"hybridize": {str(layer): digest(hybrid.model.layers[layer].mixer) for layer in layers}, "trials": {}}
    for layer in hybrid.config.attention_layers:
        for draw in range(cfg.mmr.seeds):
            with mamba_trial(hybrid, layer, seed=cfg.seed, draw=draw) as trial:
                out["trials"][f"{layer}/{draw}"] = digest(trial.model.layers[layer].mixer)
    return out


def one_run(variant: str, seed: int, device: str, teacher: Path, root: Path, preset: str | None = None) -> dict:
    from pipeline.model import kernels

    precision, mode = VARIANTS[variant]
    if mode is not None:
        kernels.set_kernel_mode(mode)
    cfg = parity_config(device, precision, seed, preset)
    record = {"variant": variant, "seed": seed, "device": device, "precision": precision}
    record.update(run_chain(cfg, root, teacher))
    record["initialisation"] = initialisation_digests(cfg, teacher, record["stages"]["loo"]["ranking"])
    record["environment"] = environment_record()
    return record


def environment_record() -> dict:
    import torch

    record = environment()
    record["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    record["threads"] = torch.get_num_threads()
    import transformers

    record["transformers"] = transformers.__version__
    return record


# --- comparison ----------------------------------------------------------------------------------

def max_relative_difference(values: list[float], reference: list[float]) -> float | None:
    """max over steps of |value - reference| / |reference| (None when the curves differ in length)."""
    if len(values) != len(reference) or not values:
        return None
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, reference))


def compare(run: dict, reference: dict) -> dict:
    """One run against the reference: per stage the loss curves' largest relative difference and the
    choices; per checkpoint the accuracy, NLL and KL differences; whether the initial weights are equal."""
    rows = []
    for name, stage in reference["stages"].items():
        mine = run["stages"].get(name)
        if mine is None:
            rows.append({"stage": name, "kind": stage["kind"], "missing": True})
            continue
        row: dict = {"stage": name, "kind": stage["kind"]}
        if "curve" in stage:
            curve = mine.get("curve", [])
            row["max_rel_loss_diff"] = max_relative_difference(curve, stage["curve"])
            row["first_step_rel_diff"] = max_relative_difference(curve[:1], stage["curve"][:1])
            row["final_loss"], row["reference_final_loss"] = curve[-1] if curve else None, stage["curve"][-1]
        if stage["kind"] == "teacher":
            row["same_weights"] = mine["model_sha256"] == stage["model_sha256"]
        if stage["kind"] in ("convert", "step"):
            row["layers"], row["reference_layers"] = mine["converted_layers"], stage["converted_layers"]
            row["same_layers"] = mine["converted_layers"] == stage["converted_layers"]
        if stage["kind"] == "loo":
            row["layers"], row["reference_layers"] = mine["ranking"], stage["ranking"]
            row["same_layers"] = mine["ranking"] == stage["ranking"]
            row["max_abs_score_diff"] = max(abs(mine["scores"][k] - v) for k, v in stage["scores"].items())
        if stage["kind"] == "mmr":
            row["layers"], row["reference_layers"] = mine["ranking"], stage["ranking"]
            row["same_layers"] = mine["ranking"] == stage["ranking"]
            # the candidates are the same layers only when the earlier conversions took the same layers
            row["same_candidates"] = sorted(mine["scores"]) == sorted(stage["scores"])
            if row["same_candidates"]:
                trials = [max_relative_difference(mine.get("trials", {}).get(trial, []), curve)
                          for trial, curve in stage.get("trials", {}).items()]
                scores = [max_relative_difference(mine["scores"][layer], losses)
                          for layer, losses in stage["scores"].items()]
                row["max_rel_loss_diff"] = None if None in trials or not trials else max(trials)
                row["max_rel_score_diff"] = None if None in scores else max(scores)
        rows.append(row)
    quality = []
    for checkpoint, ref in reference["stages"]["evaluate"]["summary"].items():
        mine = run["stages"].get("evaluate", {}).get("summary", {}).get(checkpoint, {})
        quality.append({"checkpoint": checkpoint, **{f"reference_{k}": v for k, v in ref.items()},
                        **{k: mine.get(k) for k in ref},
                        "accuracy_diff": None if mine.get("answer_accuracy") is None
                        else mine["answer_accuracy"] - ref["answer_accuracy"]})
    same_init = run["initialisation"] == reference["initialisation"]
    chosen = all(row.get("same_layers", True) for row in rows if row["kind"] in ("convert", "step"))
    accuracy = [abs(q["accuracy_diff"]) for q in quality if q["accuracy_diff"] is not None]
    curves = [row["max_rel_loss_diff"] for row in rows if row.get("max_rel_loss_diff") is not None]
    return {"variant": run["variant"], "seed": run["seed"], "stages": rows, "quality": quality,
            "initial_weights_identical": same_init, "chooses_reference_layers": chosen,
            "max_abs_accuracy_diff": max(accuracy) if accuracy else None,
            "max_rel_loss_diff": max(curves) if curves else None, "seconds": run["seconds"]}


def seed_spread(runs: list[dict]) -> dict:
    """Per checkpoint, the accuracy's standard deviation and range over the fp32 runs of several seeds."""
    by_checkpoint: dict[str, list[float]] = {}
    for run in runs:
        for checkpoint, row in run["stages"]["evaluate"]["summary"].items():
            by_checkpoint.setdefault(checkpoint, []).append(row["answer_accuracy"])
    return {checkpoint: {"seeds": [run["seed"] for run in runs], "accuracies": values,
                         "std": statistics.stdev(values) if len(values) > 1 else None,
                         "range": max(values) - min(values)} for checkpoint, values in by_checkpoint.items()}


def verdict(report: dict) -> dict:
    """The issue's goals, per variant of the reference's seed: fp32 chooses the CPU's layers and ends within
    float noise of its accuracies (ACCURACY_NOISE); bf16-mixed (and any other variant) within one seed
    spread (the fp32 runs' standard deviation over seeds) of the CPU's accuracy, checkpoint by checkpoint."""
    out = {}
    spread = report.get("seed_spread") or {}
    for result in report["comparisons"]:
        if result["seed"] != report["reference"]["seed"]:
            continue
        entry = {"initial_weights_identical": result["initial_weights_identical"],
                 "chooses_reference_layers": result["chooses_reference_layers"],
                 "max_abs_accuracy_diff": result["max_abs_accuracy_diff"],
                 "within_float_noise": result["max_abs_accuracy_diff"] is not None
                 and result["max_abs_accuracy_diff"] <= ACCURACY_NOISE}
        if spread:
            entry["within_one_seed_spread"] = all(
                abs(q["accuracy_diff"]) <= (spread[q["checkpoint"]]["std"] or 0.0) + 1e-12
                for q in result["quality"] if q["accuracy_diff"] is not None and q["checkpoint"] in spread)
        out[f"{result['variant']}-seed{result['seed']}"] = entry
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float) and value == 0.0:
        return "0"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if value and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    env, ref = report["environment"], report["reference"]
    lines = [f"# Device parity: the chain on {env['device']} against the CPU reference", "",
             f"Command: `{env['command']}`  ",
             f"Device: {env['device']}, date {env['date']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"TF32 {env['tf32']}  ",
             f"Reference: `{ref['path']}` ({ref['device']}, {ref['date']}, torch {ref['torch']}); the parity chain: "
             f"`{json.dumps(report['chain'])}`", ""]
    stage_header = ("| stage | kind | layers (this / CPU) | same | max rel. loss diff | first step "
                    "| final loss (this / CPU) |")
    for result in report["comparisons"]:
        if result["seed"] != ref["seed"]:
            verdict_line = ("Another seed than the reference's: a run for the seed spread below, compared for the "
                            "record only.")
        else:
            verdict_line = (
                f"Initial weights bit-identical to the CPU's: {_fmt(result['initial_weights_identical'])}; "
                f"conversions take the CPU's layers: {_fmt(result['chooses_reference_layers'])}; largest relative "
                f"loss-curve difference {_fmt(result['max_rel_loss_diff'])}; largest accuracy difference "
                f"{_fmt(result['max_abs_accuracy_diff'])}.")
        lines += [f"## {result['variant']}, seed {result['seed']} ({result['seconds']:.0f} s)", "", verdict_line, "",
                  stage_header, "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["stages"]:
            if row["kind"] == "evaluate":
                continue
            layers = f"{row['layers']} / {row['reference_layers']}" if "layers" in row else "-"
            final = (f"{_fmt(row['final_loss'], 6)} / {_fmt(row['reference_final_loss'], 6)}"
                     if "final_loss" in row else "-")
            same = row.get("same_layers", row.get("same_weights"))
            lines.append(f"| {row['stage']} | {row['kind']} | {layers} | {_fmt(same)} | "
                         f"{_fmt(row.get('max_rel_loss_diff'))} | {_fmt(row.get('first_step_rel_diff'))} | {final} |")
        lines += ["", "| checkpoint | accuracy (this / CPU) | NLL (this / CPU) | KL to teacher (this / CPU) |",
                  "| --- | --- | --- | --- |"]
        for q in result["quality"]:
            lines.append(f"| {q['checkpoint']} | {_fmt(q['answer_accuracy'])} / {_fmt(q['reference_answer_accuracy'])} "
                         f"| {_fmt(q['nll'], 4)} / {_fmt(q['reference_nll'], 4)} "
                         f"| {_fmt(q['kl_to_teacher'], 4)} / {_fmt(q['reference_kl_to_teacher'], 4)} |")
        lines.append("")
    spread = report.get("seed_spread")
    if spread:
        seeds = ", ".join(map(str, next(iter(spread.values()))["seeds"]))
        lines += [f"## Seed spread (fp32, seeds {seeds}) and bf16-mixed against it", "",
                  "| checkpoint | fp32 accuracies | std | range | bf16-mixed - CPU | within one std |",
                  "| --- | --- | --- | --- | --- | --- |"]
        bf16 = next((r for r in report["comparisons"] if r["variant"] == "bf16-mixed" and r["seed"] == ref["seed"]),
                    None)
        for checkpoint, row in spread.items():
            diff = None
            if bf16 is not None:
                diff = next((q["accuracy_diff"] for q in bf16["quality"] if q["checkpoint"] == checkpoint), None)
            within = None if diff is None or row["std"] is None else abs(diff) <= row["std"] + 1e-12
            lines.append(f"| {checkpoint} | {', '.join(_fmt(a) for a in row['accuracies'])} | {_fmt(row['std'])} "
                         f"| {_fmt(row['range'])} | {_fmt(diff)} | {_fmt(within)} |")
        lines.append("")
    return "\n".join(lines)


# --- commands ------------------------------------------------------------------------------------

def train_teacher(preset: str | None, root: Path, folder: Path) -> None:
    """The chain's own teacher stage on the CPU (fp32), its output copied to `folder`."""
    from pipeline.chain import run_local

    cfg = parity_config("cpu", "fp32", 0, preset)
    trained = run_local(cfg, root, until="teacher", work_root=root / ".cache" / "work" / "teacher")["teacher"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("manifest.json"))


def reference_command(args) -> None:
    root, teacher = Path(args.root), Path(args.teacher)
    if args.train_teacher:
        if teacher.exists():
            raise SystemExit(f"--train-teacher: {teacher} exists; give another --teacher folder")
        train_teacher(args.preset, root / "teacher-store", teacher)
    elif not (teacher / "config.json").is_file():
        raise SystemExit(f"--teacher {teacher}: no teacher checkpoint there (config.json); --train-teacher makes one")
    record = one_run("fp32", 0, "cpu", teacher, root, args.preset)
    record["parity"] = chain_settings(args.preset)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    summary = record["stages"]["evaluate"]["summary"]
    print({name: row["answer_accuracy"] for name, row in summary.items()}, f"{record['seconds']} s", flush=True)


def run_command(args) -> None:
    record = one_run(args.variant, args.seed, args.device, Path(args.teacher), Path(args.root), args.preset)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def compare_command(args) -> None:
    reference = json.loads(Path(args.reference).read_text())
    preset = (reference.get("parity") or {}).get("preset")
    if reference.get("parity") != chain_settings(preset):
        raise SystemExit(f"{args.reference} was made with another parity chain ({reference.get('parity')}); "
                         "make the reference again with this script")
    out_dir, root = Path(args.out_dir), Path(args.root)
    logs = out_dir / "logs"  # small: the runs' stores stay under --root
    logs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(variant, 0) for variant in args.variants] + [("fp32", seed) for seed in args.spread_seeds]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    children = []
    for variant, seed in jobs:
        out = root / f"{variant}-seed{seed}.json"
        log = open(logs / f"{variant}-seed{seed}.log", "w")
        command = [sys.executable, __file__, "run", "--variant", variant, "--seed", str(seed), "--device", args.device,
                   "--teacher", str(args.teacher), "--root", str(root / f"{variant}-seed{seed}"), "--out", str(out)] + (
                      ["--preset", preset] if preset else [])
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        children.append((variant, seed, out, log, process))
    runs, failed = [], []
    for variant, seed, out, log, process in children:
        code = process.wait()
        log.close()
        print(f"{variant} seed {seed}: exit {code}", flush=True)
        if code == 0:
            runs.append(json.loads(out.read_text()))
        else:
            failed.append({"variant": variant, "seed": seed, "exit_code": code,
                           "log_tail": Path(log.name).read_text()[-3000:]})
    environment_now = environment_record()
    report = {
        "environment": environment_now,
        "reference": {"path": str(Path(args.reference).relative_to(ROOT) if Path(args.reference).is_relative_to(ROOT)
                                  else args.reference), "device": reference["environment"]["device"],
                      "date": reference["environment"]["date"], "torch": reference["environment"]["torch"],
                      "seed": reference["seed"]},
        "chain": reference["parity"],
        "comparisons": [compare(run, reference) for run in runs],
        "seed_spread": seed_spread([run for run in runs if run["variant"] == "fp32"]) if args.spread_seeds else None,
        "failed": failed,
        "runs": runs,
    }
    report["verdict"] = verdict(report)
    device_name = environment_now["device"]
    name = args.name or ("h200" if "H200" in device_name else device_name.lower().replace(" ", "-"))
    (out_dir / f"device-parity-{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out_dir / f"device-parity-{name}.md").write_text(text)
    print(text)
    if failed:
        names = ", ".join(f"{f['variant']} seed {f['seed']}" for f in failed)
        raise SystemExit(f"{len(failed)} run(s) failed: {names}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reference", help="the CPU reference (fp32)")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--train-teacher", action="store_true",
                   help="train the teacher here (the chain's teacher stage) into --teacher")
    p.add_argument("--preset", default=None,
                   help="a conf/experiment preset instead of the parity chain (a wiring check)")
    p.add_argument("--root", default="/tmp/device-parity-reference")
    p.add_argument("--out", default=str(REFERENCE))
    p = sub.add_parser("compare", help="the variants on this device against the reference")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--variants", nargs="+", default=["fp32", "fp32-reference", "bf16-mixed"], choices=sorted(VARIANTS))
    p.add_argument("--spread-seeds", type=int, nargs="*", default=[1, 2], help="more fp32 seeds, for the seed spread")
    p.add_argument("--reference", default=str(REFERENCE))
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--root", default="/tmp/device-parity-runs", help="where the runs' stores go")
    p.add_argument("--name", default=None, help="device-parity-<name>.* (default: h200 on an H200, else the device)")
    p = sub.add_parser("run", help="one variant (a child process of compare)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None)
    args = parser.parse_args(argv)
    {"reference": reference_command, "compare": compare_command, "run": run_command}[args.command](args)


if __name__ == "__main__":
    main()
