"""The chain on one GPU, bare (`pipeline.chain.run_chain` and the executor, as `run_local`: no Prefect,
MLflow or Hydra needed).

Two measurements, each writing a JSON record:

  chain      --experiment gpu_demo --out chain.json
      The whole chain of a preset (conf/experiment/<name>.yaml, read here without Hydra), with per stage
      `stage`, `seconds`, `tokens_per_s` (mean training tokens/s of the stage's logged steps; null for
      stages that do not train), `peak_memory_gib` (CUDA peak of the stage), and the evaluation summary.

  precision  --seeds 0 1 2 --variants bf16-mixed fp32 --out precision.json
      The default demo chain under each precision and seed, on ONE teacher (trained once, bf16-mixed,
      then copied into every run, so LOO/MMR differences come from the precision alone). Runs are
      concurrent processes on the one GPU (the demo models are tiny). Diagnostic variants, bf16-mixed
      with one part put back as it was before the fix: "bf16-logits" (the losses' logits from a bf16 head
      GEMM); and two that separate bf16 compute from bf16-held frozen models (the distillation teacher,
      LOO and evaluation models): "frozen-fp32" (bf16-mixed training, frozen models held in fp32) and
      "frozen-bf16" (fp32 training, frozen models held in bf16); and "fp32-reference": fp32 with the
      PyTorch reference kernels (the CPU's code path on the GPU), to separate the CUDA kernels from the device.

  mixers     --mixers mamba gdn --counts 4 6 --seeds 0 1 2 --out gdn-quality.json
      H-K with each mixer against the other at the same K (schedule.counts=[K], schedule.mixers=[mixer]:
      the K least LOO-important layers, the first conversion's distillation) on one teacher trained once
      (gpu_demo's, `--teacher-steps` of its 2000, then copied into every run), one concurrent process per
      (mixer, K, seed); each scores its H-K on gpu_demo's held-out problems (answer accuracy, NLL, KL to the
      teacher; held in fp32 as the evaluate stage holds them). Seeds set `seed` and `train.seed`. Prints
      mean +- sample sd per (mixer, K). A CPU smoke run: --preset tiny --device cpu --counts 2 --seeds 0.

Usage on a GPU machine: PYTHONPATH=. python benchmarks/gpu_pipeline.py chain --experiment gpu_demo --out x.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import RunConfig  # noqa: E402  (no torch)


from pipeline.presets import merge as _merge  # noqa: E402
from pipeline.presets import preset_config  # noqa: E402  (conf/ presets without Hydra)


# --- per-stage measurement -----------------------------------------------------------------------

class MeasuringReporter:
    """Prints progress; keeps every tokens/s metric a stage logs (the training steps' throughput)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.tokens_per_s: list[float] = []
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key.endswith("tokens_per_second") or key.endswith("tokens_per_s"):
                self.tokens_per_s.append(float(value))
            else:
                self.metrics[key] = float(value)

    def log_artifact(self, path) -> None:
        pass

    def progress(self, message: str) -> None:
        print(f"{self.prefix}{message}", flush=True)

    @contextlib.contextmanager
    def trial(self, name: str):
        """An MMR trial reports into the stage's own figures (as the console reporter does)."""
        yield self


def run_measured_chain(cfg: RunConfig, root: Path, record_path: Path | None, prefix: str = "",
                       teacher_folder: Path | None = None, until: str = "evaluate",
                       adopted: dict[str, Path] | None = None) -> dict:
    """The chain through the one executor over a folder store `<root>/<run_name>` (as `run_local`), each
    stage timed, up to `until`. `teacher_folder`: a committed teacher adopted as this run's teacher output
    (not trained); `adopted`: more such outputs by stage name (e.g. `teacher-ft`, the fine-tuned teacher), each
    adopted when this run's key for it is not in the store yet."""
    import torch

    from pipeline.chain import run_chain
    from pipeline.executor import Executor
    from pipeline.store import open_store

    cuda = torch.cuda.is_available()
    reporter = MeasuringReporter(prefix)
    store = open_store(str(root / cfg.run_name), cache_dir=root / ".cache" / "store")

    adopt = {**({"teacher": teacher_folder} if teacher_folder is not None else {}), **(adopted or {})}

    class MeasuredExecutor(Executor):
        def dispatch(self, call, key):
            folder = adopt.get(call.name)
            if folder is not None and self.find(call, key, quiet=True) is None:
                import shutil
                import tempfile

                with tempfile.TemporaryDirectory() as scratch:  # the store writes its own manifest
                    files = Path(scratch) / call.name
                    shutil.copytree(folder, files, ignore=shutil.ignore_patterns("manifest.json"))
                    self.store.put_checkpoint(files, call.name, config_digest=key, metadata={
                        "stage": call.stage, "code_version": call.run.code_version, "cache_key": key,
                        "shared_from": str(folder)})
            return super().dispatch(call, key)

    executor = MeasuredExecutor(store, root / ".cache" / "work" / cfg.run_name, reporter)
    stages: list[dict] = []
    record = {"run_name": cfg.run_name, "stages": stages}

    def execute(call):
        reporter.tokens_per_s.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = executor(call)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rates = reporter.tokens_per_s
        stages.append({
            "stage": call.name, "kind": call.stage, "seconds": round(seconds, 2), "skipped": not out.ran,
            "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "meta": _meta_fields(store.root / call.name),
        })
        if record_path is not None:  # partial results survive a run cut short
            record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return out

    started = time.perf_counter()
    from pipeline.chain import local_teacher_source

    teacher = local_teacher_source(cfg.teacher.path) if cfg.teacher.path else None  # a user's teacher (folder, GGUF)
    run_chain(cfg, execute, teacher, until=until)
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    record["store"] = str(store.root)
    if until == "evaluate":
        record["summary"] = json.loads((store.root / "evaluate" / "summary.json").read_text())
    if record_path is not None:
        record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _meta_fields(folder) -> dict:
    path = Path(folder) / "stage.json"
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text())
    keep = ("checkpoint", "n_mamba", "layer_pattern", "converted_layers", "steps", "final_loss",
            "final_distill_loss", "answer_accuracy", "baseline", "ranking", "wall_time_s")
    return {key: meta[key] for key in keep if key in meta}


def environment() -> dict:
    import torch

    from pipeline.model import kernels

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "torch": torch.__version__, "kernels": kernels.paths_used(),
        "command": " ".join(sys.argv)}


# --- the precision comparison --------------------------------------------------------------------

def base_config(preset: str | None) -> RunConfig:
    """The default demo config (RunConfig()), or a preset's (a CPU smoke test: --preset tiny --device cpu)."""
    return preset_config(preset) if preset else RunConfig()


def variant_config(variant: str, seed: int, preset: str | None = None, device: str = "cuda") -> RunConfig:
    cfg = _merge(base_config(preset), {"run_name": f"{variant}-seed{seed}"})
    precision = "fp32" if variant in ("fp32", "frozen-bf16", "fp32-reference") else "bf16-mixed"
    return _merge(cfg, {"seed": seed, "hardware": {"device": device, "precision": precision},
                        "train": {"seed": seed}, "sft": {"train": {"seed": seed}}})


def _bf16_logits() -> None:
    """Diagnostic only: the losses form their logits with a bf16 head GEMM, as before the fix."""
    import torch

    import pipeline.train.loop as loop

    for name in ("chunked_distill_loss", "chunked_cross_entropy"):
        original = getattr(loop, name)

        def patched(*args, _original=original, **kwargs):
            kwargs["compute_dtype"] = torch.bfloat16
            return _original(*args, **kwargs)

        setattr(loop, name, patched)


def _frozen_dtype(dtype_name: str) -> None:
    """Diagnostic only: models not asked in fp32 held in `dtype_name` whatever the precision. (When this
    ran on the H200 the evaluate stage did not yet ask fp32; it now does, so "frozen-bf16" today keeps the
    evaluated models in fp32 and changes only the distillation and LOO teachers.)"""
    import torch

    import pipeline.stages.common as common

    dtype = getattr(torch, dtype_name)
    common.resolve_dtype = lambda hardware, device, *, fp32=False: torch.float32 if fp32 else dtype


def one_run(args) -> None:
    """A child process: one variant and seed, from the shared teacher."""
    if args.variant == "bf16-logits":
        _bf16_logits()
    if args.variant in ("frozen-fp32", "frozen-bf16"):
        _frozen_dtype("float32" if args.variant == "frozen-fp32" else "bfloat16")
    if args.variant == "fp32-reference":  # the CPU's code path on the GPU: PyTorch scan, conv and steps
        from pipeline.model import kernels

        kernels.set_kernel_mode("reference")
    cfg = variant_config(args.variant, args.seed, args.preset, args.device)
    record = run_measured_chain(cfg, Path(args.root), Path(args.out), prefix=f"[{cfg.run_name}] ",
                                teacher_folder=Path(args.teacher))
    record["variant"], record["seed"] = args.variant, args.seed
    record["environment"] = environment()
    Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")


def precision(args) -> None:
    from pipeline.chain import run_local

    root = Path(args.root)
    teacher_cfg = _merge(base_config(args.preset), {"run_name": "shared",
                                                    "hardware": {"device": args.device, "precision": "bf16-mixed"}})
    started = time.perf_counter()
    teacher = run_local(teacher_cfg, root, until="teacher", work_root=root / ".cache" / "work" / "shared")["teacher"]
    teacher_s = time.perf_counter() - started
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    children = []
    for variant in args.variants:
        for seed in args.seeds:
            out = root / f"{variant}-seed{seed}.json"
            log = open(root / f"{variant}-seed{seed}.log", "w")
            command = [sys.executable, __file__, "one", "--variant", variant, "--seed", str(seed), "--teacher",
                       str(teacher), "--root", str(root), "--out", str(out), "--device", args.device] + (
                ["--preset", args.preset] if args.preset else [])
            children.append((variant, seed, out, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                                   env=env), log))
    results = []
    for variant, seed, out, process, log in children:
        code = process.wait()
        log.close()
        record = json.loads(out.read_text()) if out.exists() else {}
        results.append({"variant": variant, "seed": seed, "exit_code": code, **record})
        print(f"{variant} seed {seed}: exit {code}", flush=True)
    teacher_meta = json.loads((Path(teacher) / "stage.json").read_text())
    summary = {"teacher": {"seconds": round(teacher_s, 1), "final_loss": teacher_meta.get("final_loss")},
               "runs": results, "environment": environment(), "concurrent_processes": len(children)}
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def chain_markdown(record: dict) -> str:
    """The chain record as the results page: per stage and per checkpoint, with command, device and date."""
    env = record["environment"]
    lines = [f"# experiment={record['experiment']} on {env['device']}", "",
             f"Command: `{env['command']}`; date {env['date']}; torch {env['torch']}; kernels {env['kernels']}; "
             f"whole chain {record['total_seconds']} s.", "",
             "| stage | output | seconds | tokens/s (training) | peak GPU memory GiB | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in record["stages"]:
        meta = row.get("meta", {})
        note = meta.get("layer_pattern") or ""
        if meta.get("final_loss") is not None:
            note += f" final loss {meta['final_loss']:.4f}"
        if row["skipped"]:
            note += " (found in the store)"
        lines.append(f"| {row['kind']} | {row['stage']} | {row['seconds']} | {row['tokens_per_s'] or '-'} | "
                     f"{row['peak_memory_gib'] if row['peak_memory_gib'] is not None else '-'} | {note.strip()} |")
    lines += ["", "| checkpoint | pattern | accuracy | NLL | KL to teacher | generic NLL | generic KL | tokens/s | "
              "throughput ratio | decode ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["summary"]:
        generic = (f"{r['nll_generic']:.4f} | {r['kl_generic']:.4f}" if r.get("nll_generic") is not None
                   else "- | -")
        decode = f"{r['decode_ratio']:.2f}" if "decode_ratio" in r else "-"
        lines.append(f"| {r['checkpoint']} | {r['layer_pattern']} | {r['answer_accuracy']:.3f} | {r['nll']:.4f} | "
                     f"{r['kl_to_teacher']:.4f} | {generic} | {r['tokens_per_s']:,.0f} | {r['throughput_ratio']:.2f} | "
                     f"{decode} |")
    return "\n".join(lines) + "\n"


# --- the mixer comparison: H-K with Mamba-1 against H-K with Gated DeltaNet ----------------------------

def mixer_config(preset: str, mixer: str, count: int, seed: int, device: str, teacher_steps: int | None) -> RunConfig:
    cfg = _merge(preset_config(preset), {
        "run_name": f"{mixer}-H{count}-seed{seed}", "seed": seed,
        "schedule": {"counts": [count], "mixers": [mixer]}, "sft": {"checkpoint": "last"},  # the one conversion
        "hardware": {"device": device}, "train": {"seed": seed},
    })
    if teacher_steps:
        cfg = _merge(cfg, {"teacher": {"demo": {"train": {"steps": teacher_steps}}}})
    return cfg


def score_checkpoint(cfg: RunConfig, teacher: Path, folder: Path, score_teacher: bool = False) -> dict:
    """Answer accuracy, NLL and KL to the teacher of one checkpoint on the held-out problems, both models
    held in fp32 (as the evaluate stage holds them for quality); `score_teacher`: the teacher's accuracy too."""
    import torch

    from pipeline.evaluate.quality import answer_accuracy, nll_and_kl
    from pipeline.stages.common import StageData, load_model, load_tokenizer

    data = StageData(cfg.data.view("eval"), load_tokenizer(teacher))
    problems = data.eval_problems(cfg.evaluate.num_examples, ("evaluate.max_new_tokens", cfg.evaluate.max_new_tokens))
    batches = data.eval_batches(cfg.evaluate.nll_examples)
    teacher_model = load_model(teacher, cfg.hardware, "teacher", fp32=True)
    with torch.no_grad():
        model = load_model(folder, cfg.hardware, "checkpoint", fp32=True)
        accuracy, _ = answer_accuracy(model, data.tokenizer, problems, batch_size=cfg.evaluate.batch_size,
                                      max_new_tokens=cfg.evaluate.max_new_tokens)
        quality = nll_and_kl(model, batches, teacher=teacher_model)
        extra = {}
        if score_teacher:
            extra["teacher_answer_accuracy"], _ = answer_accuracy(
                teacher_model, data.tokenizer, problems, batch_size=cfg.evaluate.batch_size,
                max_new_tokens=cfg.evaluate.max_new_tokens)
    return {"answer_accuracy": accuracy, "nll": quality["nll"], "kl_to_teacher": quality.get("kl_to_teacher"),
            "examples": len(problems), "layer_pattern": model.config.layer_pattern, **extra}


def one_mixer_run(args) -> None:
    """A child process: one (mixer, K, seed) from the shared teacher: LOO, the conversion, its quality."""
    from pipeline.recipe import TEACHER_FINETUNED

    cfg = mixer_config(args.preset, args.mixer, args.count, args.seed, args.device, args.teacher_steps)
    record = {"mixer": args.mixer, "count": args.count, "seed": args.seed}
    # the teacher the conversion distils from (the fine-tuned one, where the preset fine-tunes) is the one
    # every run adopts, and the one its quality is scored against
    distilled_from = Path(args.teacher_ft or args.teacher)
    try:
        chain_record = run_measured_chain(cfg, Path(args.root), None, prefix=f"[{cfg.run_name}] ",
                                          teacher_folder=Path(args.teacher), until="convert",
                                          adopted={TEACHER_FINETUNED: Path(args.teacher_ft)} if args.teacher_ft
                                          else None)
        folder = Path(chain_record["store"]) / f"H-{args.count}"
        record.update(stages=chain_record["stages"],
                      **score_checkpoint(cfg, distilled_from, folder, score_teacher=args.score_teacher))
        print(f"[{cfg.run_name}] accuracy {record['answer_accuracy']:.3f} NLL {record['nll']:.4f} "
              f"KL {record['kl_to_teacher']:.4f} ({record['layer_pattern']})", flush=True)
    except Exception as error:  # one failed run is a record, not the end of the comparison
        import traceback

        record["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    record["environment"] = environment()
    Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def mixers(args) -> None:
    from pipeline.chain import run_local
    from pipeline.recipe import TEACHER_FINETUNED

    root = Path(args.root)
    started = time.perf_counter()
    teacher_cfg = _merge(mixer_config(args.preset, args.mixers[0], args.counts[0], 0, args.device, args.teacher_steps),
                         {"run_name": "shared"})
    outputs = run_local(teacher_cfg, root, until="teacher", work_root=root / ".cache" / "work" / "shared")
    teacher, teacher_ft = outputs["teacher"], outputs.get(TEACHER_FINETUNED)  # fine-tuned where the preset says
    teacher_s = time.perf_counter() - started
    print(f"teacher: {teacher_s:.0f} s", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    children = []
    for mixer in args.mixers:
        for count in args.counts:
            for seed in args.seeds:
                name = f"{mixer}-H{count}-seed{seed}"
                out, log = root / f"{name}.json", open(root / f"{name}.log", "w")
                command = [sys.executable, __file__, "one-mixer", "--mixer", mixer, "--count", str(count), "--seed",
                           str(seed), "--teacher", str(teacher), "--root", str(root), "--out", str(out), "--device",
                           args.device, "--preset", args.preset] + (
                    ["--teacher-steps", str(args.teacher_steps)] if args.teacher_steps else []) + (
                    ["--teacher-ft", str(teacher_ft)] if teacher_ft is not None else []) + (
                    ["--score-teacher"] if not children else [])
                children.append((name, out, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                                 log))
    runs = []
    for name, out, process, log in children:
        try:
            code = process.wait(timeout=max(args.timeout - (time.perf_counter() - started), 1))
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        log.close()
        record = json.loads(out.read_text()) if out.exists() else {"error": f"no record (exit {code})"}
        record["exit_code"] = code
        runs.append(record)
        tail = (root / f"{name}.log").read_text().strip().splitlines()[-1:] if code != 0 else []
        print(f"{name}: exit {code} {record.get('error', '')} {' '.join(tail)[:300]}", flush=True)
    summary = []
    for mixer in args.mixers:
        for count in args.counts:
            mine = [r for r in runs if r.get("mixer") == mixer and r.get("count") == count and "error" not in r]
            row = {"mixer": mixer, "count": count, "seeds": sorted(r["seed"] for r in mine)}
            for key in ("answer_accuracy", "nll", "kl_to_teacher"):
                row[key], row[f"{key}_sd"] = mean_sd([r[key] for r in mine])
            row["patterns"] = sorted({r["layer_pattern"] for r in mine})
            summary.append(row)
    teacher_meta = json.loads((Path(teacher_ft or teacher) / "stage.json").read_text())
    result = {"teacher": {"seconds": round(teacher_s, 1), "final_loss": teacher_meta.get("final_loss"),
                          "steps": teacher_meta.get("steps"),
                          "answer_accuracy": next((r["teacher_answer_accuracy"] for r in runs
                                                   if "teacher_answer_accuracy" in r), None)},
              "preset": args.preset, "summary": summary, "runs": runs, "environment": environment(),
              "total_seconds": round(time.perf_counter() - started, 1), "concurrent_processes": len(children)}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nteacher accuracy {result['teacher']['answer_accuracy']}; {len(children)} runs in "
          f"{result['total_seconds']} s")
    print(f"{'mixer':<7}{'K':>3}{'seeds':>8}{'accuracy':>18}{'NLL':>20}{'KL to teacher':>20}")
    for row in summary:
        cells = [f"{row[k]:.4f} +- {row[k + '_sd']:.4f}" if row[k] is not None else "-"
                 for k in ("answer_accuracy", "nll", "kl_to_teacher")]
        print(f"{row['mixer']:<7}{row['count']:>3}{len(row['seeds']):>8}{cells[0]:>18}{cells[1]:>20}{cells[2]:>20}")


def chain(args) -> None:
    cfg = preset_config(args.experiment)
    out = Path(args.out)
    record = run_measured_chain(cfg, Path(args.root), out, until=args.until)
    record["experiment"], record["environment"] = args.experiment, environment()
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(chain_markdown(record))
    for row in record.get("summary", []):
        print({k: row.get(k) for k in ("checkpoint", "answer_accuracy", "nll", "kl_to_teacher", "tokens_per_s")})
    print(f"whole chain: {record['total_seconds']} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chain")
    p.add_argument("--experiment", default="gpu_demo")
    p.add_argument("--root", default="/tmp/gpu-pipeline")
    p.add_argument("--out", default="gpu-chain.json")
    p.add_argument("--markdown", default=None, help="also write the results page (markdown) here")
    p.add_argument("--until", default="evaluate", help="the last stage to run (pipeline.chain.UNTIL), e.g. sft "
                   "to leave the evaluation to a second call on the same --root")
    p = sub.add_parser("precision")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["bf16-mixed", "fp32"])
    p.add_argument("--root", default="/tmp/gpu-precision")
    p.add_argument("--out", default="gpu-precision.json")
    p.add_argument("--preset", default=None)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("one")
    p.add_argument("--variant", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("mixers")
    p.add_argument("--mixers", nargs="+", default=["mamba", "gdn"])
    p.add_argument("--counts", type=int, nargs="+", default=[4, 6])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-steps", type=int, default=None, help="the demo teacher's steps (default: the preset's)")
    p.add_argument("--preset", default="gpu_demo")
    p.add_argument("--root", default="/tmp/gpu-mixers")
    p.add_argument("--out", default="gdn-quality.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole comparison")
    p = sub.add_parser("one-mixer")
    p.add_argument("--mixer", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="gpu_demo")
    p.add_argument("--device", default="cuda")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--teacher-ft", default=None, help="the fine-tuned teacher every run adopts and is scored against")
    p.add_argument("--score-teacher", action="store_true", help="also the teacher's accuracy (one child does it)")
    args = parser.parse_args()
    {"chain": chain, "precision": precision, "one": one_run, "mixers": mixers,
     "one-mixer": one_mixer_run}[args.command](args)


if __name__ == "__main__":
    main()
