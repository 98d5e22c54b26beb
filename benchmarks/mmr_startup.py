"""MMR worker start-up: the first MMR stage of a run against the later ones (the workers are kept for the run).

A worker's start-up is the time from its stage's start to its teacher and parent loaded on its device, as
the stage records it (stage.json `workers.worker_startup_s`, `pipeline.stages.workers`): for the first
stage it includes spawning the process, importing torch and transformers and initialising the device;
later stages reuse the process and only load the two models. The issue's goal: at most 3 s a worker after
the first stage, on one GPU with two workers.

Two ways to run it:
- stages (default): K consecutive MMR stages in this process (`pipeline.stages.run_mmr`, exactly as the
  chain calls it), each on its own parent, as a chain's MMR stages go (the parent of stage s has s fewer
  attention layers: candidates, candidates - 1, ...). The teacher is a random-init TinyLlama-1.1B shape
  (as benchmarks/mmr_fanout.py builds it, bf16 on CUDA) unless --tiny. On CUDA, --workers 2 on one GPU
  puts both workers on it.
- --chain (CPU): the real chain (`pipeline.chain.run_local`) with experiment=tiny, schedule.counts
  [2,3,4] and hardware.nproc=2: its conversions train under torchrun (two gloo processes) and its two MMR
  stages fan out over two workers, which the second stage reuses.
Prints each stage's start-up per worker and the stage's wall time, and writes them to --out (JSON, with
the command, device and date).

GPU (one H200, two workers sharing it, about 2 minutes):
    python benchmarks/mmr_startup.py --device cuda --workers 2 --out benchmarks/results/mmr-startup-h200.json
CPU:
    python benchmarks/mmr_startup.py --chain --out /tmp/mmr-startup-chain.json
    python benchmarks/mmr_startup.py --tiny --device cpu --out /tmp/mmr-startup-tiny.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# this checkout's `pipeline`, whatever is installed (the worker processes inherit sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmr_fanout import TINY, TINYLLAMA, TimedReporter, write_data  # noqa: E402  (the fan-out benchmark's helpers)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the JSON results go")
    parser.add_argument("--chain", action="store_true", help="the tiny chain on the CPU (counts 2,3,4, nproc 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (stages mode)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--workers", type=int, default=2, help="hardware.nproc: MMR worker processes")
    parser.add_argument("--stages", type=int, default=3, help="consecutive MMR stages (stages mode)")
    parser.add_argument("--candidates", type=int, default=4, help="attention layers in the first stage's parent")
    parser.add_argument("--steps", type=int, default=None, help="steps a trial (10; tiny: 3)")
    parser.add_argument("--batch", type=int, default=None, help="rows a step (4; tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens a row (1024; tiny: 64)")
    parser.add_argument("--work-dir", default=None, help="where models, data and stage folders go (a temp dir)")
    args = parser.parse_args(argv)
    for name, value in (dict(steps=3, batch=2, seq=64) if args.tiny else dict(steps=10, batch=4, seq=1024)).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in (TINY if args.tiny else TINYLLAMA).items():
        setattr(args, name, value)
    if not args.chain and not args.stages <= args.candidates < args.layers:
        parser.error(f"--candidates must be at least --stages and below the {args.layers} layers")
    return args


def build_models(args, root: Path) -> tuple[Path, list[Path], list[list[int]]]:
    """teacher/ and one parent a stage: parent s keeps `candidates - s` attention layers (spread over the
    depth), every other layer Mamba."""
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.convert import hybridize
    from pipeline.data import build_char_tokenizer

    tokenizer = build_char_tokenizer(model_max_length=max(4096, args.seq))
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(4096, args.seq), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(args.device):
        teacher = LlamaForCausalLM(config)
    teacher.to(torch.bfloat16 if args.device == "cuda" else torch.float32)
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    parents, attentions = [], []
    for stage in range(args.stages):
        keep = args.candidates - stage
        attention = sorted({round(i * (args.layers - 1) / max(1, keep - 1)) for i in range(keep)} if keep > 1
                           else {args.layers // 2})
        parent = hybridize(teacher, [i for i in range(args.layers) if i not in attention], seed=0)
        folder = root / f"parent-{stage}"
        parent.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        parents.append(folder)
        attentions.append(attention)
        del parent
        gc.collect()
    del teacher
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return teacher_dir, parents, attentions


def run_stages(args, root: Path) -> list[dict]:
    from pipeline.config import DataConfig, HardwareConfig, MMRConfig
    from pipeline.stages import run_mmr
    from pipeline.train import TrainConfig

    teacher_dir, parents, attentions = build_models(args, root)
    data = DataConfig(distill=str(write_data(args, root)), max_length=args.seq)
    mmr = MMRConfig(train=TrainConfig(
        steps=args.steps, lr=2e-3, warmup_steps=min(2, args.steps - 1), batch_size=args.batch, max_length=args.seq,
        trainable="mamba", loss="reverse_kl", kl_chunk_tokens=1024, loss_window=min(5, args.steps),
        log_every=max(1, args.steps // 2)))
    hardware = HardwareConfig(device=args.device, precision="auto", nproc=args.workers)
    stages = []
    for index, (parent, attention) in enumerate(zip(parents, attentions, strict=True)):
        reporter = TimedReporter(f"[stage {index}] ")
        run_mmr(mmr, data, hardware, 0, teacher=teacher_dir, parent=parent, out_dir=root / f"mmr-{index}",
                work_dir=root / f"work-{index}", reporter=reporter)
        seconds = time.perf_counter() - reporter.begin
        stages.append(stage_record(f"mmr-{index}", root / f"mmr-{index}", seconds, attention))
    return stages


def run_chain(args, root: Path) -> list[dict]:
    """The tiny chain up to its last step, nproc 2; its MMR stages' records."""
    import dataclasses

    from pipeline.chain import run_local
    from pipeline.presets import preset_config

    cfg = preset_config("tiny")
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, counts=[2, 3, 4]),
                              hardware=dataclasses.replace(cfg.hardware, nproc=args.workers),
                              storage=dataclasses.replace(cfg.storage, cache_dir=str(root / ".cache")))
    started = time.perf_counter()
    outputs = run_local(cfg, root / "store", until="steps")
    print(f"chain to the last step: {time.perf_counter() - started:.1f} s", flush=True)
    stages = []
    for name in sorted(name for name in outputs if name.startswith("mmr-")):
        meta = json.loads((outputs[name] / "stage.json").read_text())
        kinds = json.loads((outputs[name] / "mmr.json").read_text())["ranking"]
        stages.append(stage_record(name, outputs[name], meta["wall_time_s"], sorted(e["layer"] for e in kinds)))
    return stages


def stage_record(name: str, folder: Path, seconds: float, candidates) -> dict:
    meta = json.loads((folder / "stage.json").read_text())
    workers = meta.get("workers") or {}
    return {"stage": name, "seconds": round(seconds, 2), "candidates": candidates,
            "worker_startup_s": workers.get("worker_startup_s"), "workers_reused": workers.get("workers_reused"),
            "ranking": [entry["layer"] for entry in meta["ranking"]]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.chain and args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
    scratch = tempfile.TemporaryDirectory(prefix="mmr-startup-") if args.work_dir is None else None
    root = Path(args.work_dir or scratch.name)
    root.mkdir(parents=True, exist_ok=True)
    stages = run_chain(args, root) if args.chain else run_stages(args, root)
    print(f"\n{'stage':<12}{'workers':>10}{'start-up per worker (s)':>28}{'stage s':>10}")
    for record in stages:
        startup = record["worker_startup_s"] or {}
        kind = "reused" if record["workers_reused"] else "started"
        print(f"{record['stage']:<12}{kind:>10}{', '.join(f'{s:.2f}' for s in startup.values()):>28}"
              f"{record['seconds']:>10.1f}")
    later = [s for record in stages[1:] for s in (record["worker_startup_s"] or {}).values()]
    if later:
        print(f"largest start-up after the first stage: {max(later):.2f} s (goal: at most 3 s)")
    device = torch.cuda.get_device_name() if args.device == "cuda" and not args.chain else "cpu"
    report = {
        "stages": stages,
        "largest_later_startup_s": max(later) if later else None,
        "definition": "worker start-up: from the stage's start to that worker's teacher and parent loaded on its "
                      "device (the first stage: spawning, imports and device initialisation too)",
        "settings": ({"mode": "the chain, experiment=tiny, schedule.counts [2,3,4], hardware.nproc "
                               f"{args.workers}, until the last step", "workers": args.workers} if args.chain else
                     {"mode": f"{args.stages} consecutive run_mmr stages", "workers": args.workers,
                      "steps": args.steps, "batch": args.batch, "seq": args.seq,
                      "model": {name: getattr(args, name) for name in TINYLLAMA}}),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{args.workers} workers on {device}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
