"""Wall time of the MMR stage on 1 and on 2 GPUs for the same candidates (issue 16's `mmr_seconds`).

Builds a random-init teacher of TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads of 64, 4 KV heads,
MLP 5632, vocab 32000) as a real transformers `LlamaForCausalLM` saved with save_pretrained (bf16) plus
the project's char tokenizer, and a parent hybrid from it (`hybridize`, every layer Mamba except
`--candidates` attention layers spread over the depth, saved the same way). Training text: random
characters, one row of `--seq` tokens each, written as a jsonl file that data.distill points to. Then it
runs the MMR stage (`pipeline.stages.run_mmr`, exactly as the chain calls it, bf16-mixed) once with
hardware.nproc=1 (the in-process sequential path) and once with hardware.nproc=2 (two worker processes,
one GPU each), on the same candidates, and times each call, model loading included. Every trial trains
one mixer for `--steps` steps at `--batch` x `--seq` tokens; the teacher runs inside each step.

Writes JSON to --out: mmr_seconds {"1", "2"}, first_step_seconds (the part of each before the first
training step was reported: model loading, worker start-up and step 1), the scores of both runs, whether
the rankings agree, the largest relative difference of a layer's score, settings, command, device, date,
torch and kernel paths.
Bare: needs torch, transformers and this package (no prefect / mlflow / hydra / boto3).

GPU (2 x H200, about 3 minutes with the defaults):
    python benchmarks/mmr_fanout.py --out benchmarks/results/mmr-fanout-h200x2.json
CPU wiring check (tiny sizes, 2 worker processes):
    python benchmarks/mmr_fanout.py --tiny --device cpu --out /tmp/mmr-fanout-tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

# this checkout's `pipeline`, whatever is installed (the stage's worker processes inherit sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINYLLAMA = dict(hidden=2048, layers=22, heads=32, kv_heads=4, head_dim=64, intermediate=5632, vocab=32000)
TINY = dict(hidden=64, layers=6, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the JSON results go")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU wiring check")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--nprocs", default="1,2", help="hardware.nproc values to time, comma-separated")
    parser.add_argument("--candidates", type=int, default=4, help="attention layers left in the parent (trials)")
    parser.add_argument("--steps", type=int, default=None, help="steps per trial (20; tiny: 3)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (4; tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (2048; tiny: 64)")
    for name in TINYLLAMA:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"model {name} ({TINYLLAMA[name]}; tiny: {TINY[name]})")
    parser.add_argument("--work-dir", default=None, help="where models, data and stage folders go (a temp dir)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else TINYLLAMA
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    defaults = dict(steps=3, batch=2, seq=64) if args.tiny else dict(steps=20, batch=4, seq=2048)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.nprocs = [int(n) for n in args.nprocs.split(",")]
    if not 1 <= args.candidates < args.layers:
        parser.error(f"--candidates must be in [1, {args.layers - 1}]")
    return args


def build_models(args, root: Path) -> tuple[Path, Path, list[int]]:
    """teacher/ (Llama + tokenizer) and parent/ (the hybrid with `candidates` attention layers left)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.convert import hybridize
    from pipeline.data import build_char_tokenizer

    tokenizer = build_char_tokenizer(model_max_length=max(4096, args.seq))
    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(4096, args.seq), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        teacher = LlamaForCausalLM(config)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    teacher.to(dtype)
    # the candidates spread over the depth; every other layer Mamba
    attention = sorted({round(i * (args.layers - 1) / max(1, args.candidates - 1)) for i in range(args.candidates)}
                       if args.candidates > 1 else {args.layers // 2})
    parent = hybridize(teacher, [i for i in range(args.layers) if i not in attention], seed=0)
    teacher_dir, parent_dir = root / "teacher", root / "parent"
    for model, folder in ((teacher, teacher_dir), (parent, parent_dir)):
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    del teacher, parent
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return teacher_dir, parent_dir, attention


def write_data(args, root: Path) -> Path:
    """Rows of `seq` random characters (every token a training token), enough for every trial's steps."""
    from pipeline.data.tokenizer import DEFAULT_CHARSET

    rng = random.Random(0)
    charset = [c for c in DEFAULT_CHARSET if c.strip()]
    path = root / "distill.jsonl"
    rows = args.steps * args.batch * 2 + 8
    with open(path, "w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": "".join(rng.choice(charset) for _ in range(args.seq))}) + "\n")
    return path


class TimedReporter:
    """Prints the stage's progress (as ConsoleReporter) and notes when the first training step is reported:
    before it, the stage loads models (and starts workers); after it, trials train."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.begin, self.first_step = prefix, time.perf_counter(), None

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_artifact(self, path) -> None:
        pass

    def progress(self, message: str) -> None:
        if self.first_step is None and " step " in message:
            self.first_step = time.perf_counter() - self.begin
        print(f"{self.prefix}{message}", flush=True)

    @contextlib.contextmanager
    def trial(self, name: str):
        yield self


def main(argv=None) -> None:
    args = parse_args(argv)
    from pipeline.config import DataConfig, HardwareConfig, MMRConfig
    from pipeline.model import kernels
    from pipeline.stages import run_mmr
    from pipeline.train import TrainConfig

    if args.device == "cuda" and torch.cuda.device_count() < max(args.nprocs):
        raise SystemExit(f"--nprocs {max(args.nprocs)} needs that many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    scratch = tempfile.TemporaryDirectory(prefix="mmr-fanout-") if args.work_dir is None else None
    root = Path(args.work_dir or scratch.name)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher_dir, parent_dir, attention = build_models(args, root)
    data = DataConfig(distill=str(write_data(args, root)), max_length=args.seq)
    build_s = time.perf_counter() - started
    print(f"models and data built in {build_s:.1f} s; candidates {attention}", flush=True)

    mmr = MMRConfig(train=TrainConfig(
        steps=args.steps, lr=2e-3, warmup_steps=min(2, args.steps - 1), batch_size=args.batch, max_length=args.seq,
        trainable="mamba", loss="reverse_kl", kl_chunk_tokens=1024, loss_window=min(5, args.steps),
        log_every=max(1, args.steps // 4)))
    seconds, first_step, scores = {}, {}, {}
    for nproc in args.nprocs:
        hardware = HardwareConfig(device=args.device, precision="auto", nproc=nproc)
        stage_root = root / f"nproc-{nproc}"
        reporter = TimedReporter(f"[nproc={nproc}] ")
        result = run_mmr(mmr, data, hardware, 0, teacher=teacher_dir, parent=parent_dir, out_dir=stage_root / "mmr",
                         work_dir=stage_root / "work", reporter=reporter)
        seconds[str(nproc)] = round(time.perf_counter() - reporter.begin, 2)
        first_step[str(nproc)] = round(reporter.first_step, 2)
        scores[str(nproc)] = {str(e["layer"]): e["loss"] for e in result["ranking"]}
        print(f"nproc={nproc}: MMR stage {seconds[str(nproc)]} s, ranking {[e['layer'] for e in result['ranking']]}",
              flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    rankings = {n: sorted(s, key=lambda layer: (s[layer], int(layer))) for n, s in scores.items()}
    first = scores[str(args.nprocs[0])]
    relative = max((abs(s[layer] - first[layer]) / abs(first[layer]) for s in scores.values() for layer in first),
                   default=0.0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "mmr_seconds": seconds,
        "scores": scores,
        "rankings": rankings,
        "same_ranking": len({tuple(r) for r in rankings.values()}) == 1,
        "max_score_relative_difference": relative,
        "first_step_seconds": first_step,  # from the call to the first step's report: loading, start-up, step 1
        "speedup": {n: round(seconds[str(args.nprocs[0])] / s, 3) for n, s in seconds.items()},
        "build_seconds": round(build_s, 2),
        "settings": {"model": {name: getattr(args, name) for name in TINYLLAMA}, "candidates": attention,
                     "steps": args.steps, "batch": args.batch, "seq": args.seq, "precision": "auto",
                     "timed": "one run_mmr call each: model loading, worker start-up and every trial",
                     "tiny": args.tiny},
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "device": f"{max(args.nprocs)} x {device}" if args.device == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "kernels": kernels.paths_used(),
        "pipeline": str(Path(sys.modules["pipeline"].__file__).parent),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("mmr_seconds", "same_ranking", "max_score_relative_difference")}))
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
