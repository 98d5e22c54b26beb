"""The reasoning workload: short prompts, long generations, every model at its largest batch.

What users compare with the recipe's headline (H-30 2.1x, H-40 3.4x the teacher's throughput, in vLLM):
requests of a ~1k-token prompt that each generate 16k tokens, served in one static batch as large as the
card holds. For the teacher and H-25 / H-30 / H-40 at the Apriel-15B shape (random bf16 weights, built as
benchmarks/throughput.py builds them; speed does not depend on the values), through the one generation
engine (`pipeline.evaluate.engine.GenerationEngine`, the same code path for all four):

- The batch: the largest whose whole generation fits, found by probing, not assumed. Two probe batches are
  each allocated (static caches at prompt + new tokens) and run through the generation's worst moments (a
  prefill micro-batch, decode steps at the full cache), and the peak memory the allocator reserved is
  measured; the batch is the largest whose peak, extrapolated linearly from the two, stays under the card's
  free memory less a margin (--margin, default 10% of the card). The measurement then runs at that batch,
  which must fit; were it to run out of memory, it runs again in a new process at 90% of the batch
  (`shrunk` counts how often).
- The time, integrated over fill levels (not one whole 16k-token generation, which would take many
  minutes a model): prefill is measured on one micro-batch of prompts and scaled to the batch (it is
  compute-bound, linear in the sequences), and the decode step is timed at --levels cache fill levels
  evenly spaced from the prompt's length to the last token's (a few CUDA-graph replays each, after warm-up
  steps), its time integrated over the generation's steps by the trapezoid rule. Every sequence generates
  all 16k tokens (a static batch: no sequence leaves early).
- Reported per model: batch, prefill s, decode s, `total_tokens_per_s` = batch x new tokens / (prefill +
  decode) (generated tokens a second over the whole workload), `processed_tokens_per_s` (prompt tokens
  counted too), each one's ratio to the teacher, and the decode step's time at each fill level.

Each model runs in a process of its own (a model and its engine leave nothing behind for the next).

`--models` also takes H-30-GDN and H-40-GDN (Gated DeltaNet layers where the Mamba-1 checkpoints have Mamba).
With `--teacher-from` a run without the teacher takes its ratios from an earlier run's teacher record (the
same card and workload; for runs split over consecutive calls on one machine).

GPU (one H200, the four default models, about 4 minutes):
    python benchmarks/reasoning_workload.py --out benchmarks/results/reasoning-workload-h200.json
CPU (a tiny shape, the same steps; seconds):
    python benchmarks/reasoning_workload.py --smoke --out /tmp/reasoning-smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# this checkout's `pipeline` and the throughput benchmark's builders
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# with --smoke on the command line, throughput.py itself takes its tiny CPU shape (APRIEL_15B) and device
from throughput import APRIEL_15B, build, cache_bytes_per_sequence  # noqa: E402

from pipeline.evaluate.engine import GenerationEngine  # noqa: E402

# The recipe's checkpoints at the 50-layer shape: name -> (mixer, converted layers), the mixer as
# throughput.py's specs name it ("" Mamba-1, "gdn" Gated DeltaNet); the smoke shape (throughput.py's, six
# layers: `--smoke` there too) keeps their share. The default is the recipe's Mamba-1 checkpoints.
MODELS = {"teacher": ("", 0), "H-25": ("", 25), "H-30": ("", 30), "H-40": ("", 40),
          "H-30-GDN": ("gdn", 30), "H-40-GDN": ("gdn", 40)}
DEFAULT_MODELS = "teacher,H-25,H-30,H-40"
RECIPE_LAYERS = 50
DEFINITIONS = {
    "total_tokens_per_s": "batch * new_tokens / (prefill_s + decode_s): generated tokens a second over the whole "
                          "workload (every sequence: a prompt of prompt_tokens, then new_tokens generated)",
    "processed_tokens_per_s": "batch * (prompt_tokens + new_tokens) / (prefill_s + decode_s)",
    "ratio_to_teacher": "total_tokens_per_s / the teacher's (processed tokens give the same ratio: same token counts)",
    "prefill_s": "one micro-batch of prompts measured, scaled to the batch",
    "decode_s": "the decode step's time at `levels` fill levels, integrated over the new_tokens - 1 steps (trapezoid)",
    "batch": "the largest batch whose probed peak memory, extrapolated, fits under the free memory less the margin",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the JSON results go")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: the same steps in seconds")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (1024; smoke: 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens a sequence (16384; smoke: 48)")
    parser.add_argument("--levels", type=int, default=None, help="fill levels the decode step is timed at (9; smoke: 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps a fill level (6; smoke: 2)")
    parser.add_argument("--prefill-batch", type=int, default=8, help="sequences a prefill forward (at most)")
    parser.add_argument("--margin", type=float, default=0.10, help="memory kept free, as a share of the card")
    parser.add_argument("--memory-gib", type=float, default=0.006,
                        help="smoke: the memory budget the batch search works against (the CPU has no card)")
    parser.add_argument("--teacher-from", default=None,
                        help="the teacher's record from an earlier run of this script on the same machine and "
                             "workload (its JSON): the ratios use it when --models has no teacher")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # one model, in its own process
    parser.add_argument("--shrink", type=int, default=0, help=argparse.SUPPRESS)  # 90% of the batch, this many times
    args = parser.parse_args(argv)
    defaults = (dict(prompt=16, new_tokens=48, levels=3, steps=2) if args.smoke
                else dict(prompt=1024, new_tokens=16384, levels=9, steps=6))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    if args.levels < 2 or args.steps < 1 or not 0 <= args.margin < 1:
        parser.error("--levels must be >= 2, --steps >= 1, --margin in [0, 1)")
    return args


def mamba_layers(name: str) -> int:
    """The model's converted layers at the shape measured: the recipe's share of its 50 layers."""
    return round(MODELS[name][1] * APRIEL_15B["num_hidden_layers"] / RECIPE_LAYERS)


def model_spec(name: str) -> str:
    """throughput.py's spec of the model at the shape measured: "30" Mamba-1 H-30, "gdn30" Gated DeltaNet."""
    return f"{MODELS[name][0]}{mamba_layers(name)}"


class Memory:
    """Peak memory of a stretch of work and the budget it must fit: on CUDA the caching allocator's reserved
    peak against the card's free memory less the margin; on the CPU (smoke) the engine's buffers counted
    against --memory-gib (the same search, on an accounted budget)."""

    def __init__(self, args, model) -> None:
        self.cuda = torch.cuda.is_available() and not args.smoke
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            self.budget = free - args.margin * total
            self.card = total
        else:
            self.card = args.memory_gib * 2**30
            self.budget = self.card * (1 - args.margin) - weights

    def start(self) -> None:
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_reserved()

    def peak(self, engine) -> float:
        if self.cuda:
            return torch.cuda.max_memory_reserved() - self.base
        return float(engine.cache_bytes())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def new_engine(model, batch: int, args, prefill_batch: int) -> GenerationEngine:
    return GenerationEngine(model, batch_size=batch, max_length=args.prompt + args.new_tokens,
                            prefill_batch=min(prefill_batch, batch))


def set_fill(engine: GenerationEngine, fill: int) -> None:
    """The caches as if `fill` tokens were in them (decode speed does not depend on their values)."""
    engine.positions.fill_(fill)
    engine.slot.fill_(fill)
    engine.key_valid.zero_()
    engine.key_valid[:, :fill] = True


def prompts(model, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=generator).to(device)
    return ids, torch.ones_like(ids)


def probe(model, batch: int, args, memory: Memory, prefill_batch: int) -> float:
    """Peak memory of a batch's worst moments: its caches, a prefill micro-batch, decode steps at a full cache."""
    memory.start()
    engine = new_engine(model, batch, args, prefill_batch)
    ids, mask = prompts(model, engine.prefill_batch, args.prompt)
    engine._prefill(ids, mask)
    set_fill(engine, args.prompt + args.new_tokens - 4)
    for _ in range(3):  # warm-up steps, the graph capture, a replay
        engine._run_step()
    sync()
    peak = memory.peak(engine)
    del engine
    return peak


def largest_batch(model, args, memory: Memory, spec: str) -> dict:
    """Two probes, a linear fit of peak memory in the batch, the largest batch under the budget."""
    per_sequence = cache_bytes_per_sequence(spec, args.prompt + args.new_tokens)
    guess = max(int(memory.budget // per_sequence), 2)
    # both probes and the measurement prefill the same micro-batch (its workspace is part of the peak)
    prefill_batch = max(1, min(args.prefill_batch, guess // 4))
    small = prefill_batch
    large = max(small + 1, min(guess // 2, 8 * prefill_batch))
    peaks = {small: probe(model, small, args, memory, prefill_batch),
             large: probe(model, large, args, memory, prefill_batch)}
    slope = (peaks[large] - peaks[small]) / (large - small)
    intercept = peaks[small] - slope * small
    batch = max(1, int((memory.budget - intercept) // slope)) if slope > 0 else guess
    return {"batch": batch, "prefill_batch": prefill_batch, "probes": {str(b): p for b, p in peaks.items()},
            "bytes_per_sequence": slope, "fixed_bytes": intercept, "budget_bytes": memory.budget,
            "cache_bytes_per_sequence": per_sequence}


def measure(model, batch: int, args, prefill_batch: int) -> dict:
    """Prefill scaled from one micro-batch; the decode step timed at fill levels and integrated."""
    engine = new_engine(model, batch, args, prefill_batch)
    sample = engine.prefill_batch
    warm_ids, warm_mask = prompts(model, 1, min(args.prompt, 256))
    engine._prefill(warm_ids, warm_mask)  # warm-up
    ids, mask = prompts(model, sample, args.prompt)
    sync()
    start = time.perf_counter()
    engine._prefill(ids, mask)
    sync()
    prefill_s = (time.perf_counter() - start) * batch / sample
    first, last = args.prompt, args.prompt + args.new_tokens - 1  # decode steps fill these cache columns
    levels = [round(first + (last - first) * i / (args.levels - 1)) for i in range(args.levels)]
    step_s, timed_at = [], []
    warm = 3  # untimed steps at each level (at the first: Triton compiles, then the CUDA graph is captured)
    for level in levels:
        at = min(level, args.prompt + args.new_tokens - 1 - warm - args.steps)  # the steps stay in the caches
        timed_at.append(at)
        set_fill(engine, at)
        for _ in range(warm):
            engine._run_step()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine._run_step()
        sync()
        step_s.append((time.perf_counter() - start) / args.steps)
    steps = args.new_tokens - 1
    width = (last - first) / (args.levels - 1)
    integral = sum((step_s[i] + step_s[i + 1]) / 2 * width for i in range(args.levels - 1))
    decode_s = integral * steps / (last - first) if last > first else step_s[0] * steps
    total = prefill_s + decode_s
    return {
        "batch": batch, "prefill_s": prefill_s, "prefill_measured_sequences": sample, "decode_s": decode_s,
        "fill_levels": levels, "timed_from_fill": timed_at, "decode_step_ms": [s * 1e3 for s in step_s],
        "total_tokens_per_s": batch * args.new_tokens / total,
        "processed_tokens_per_s": batch * (args.prompt + args.new_tokens) / total,
        "cache_gib": engine.cache_bytes() / 2**30, "fused_decode": engine.fused, "cuda_graph": engine.use_graph,
    }


def single(name: str, args) -> dict:
    """One model: build, find its batch, measure (in this process)."""
    from pipeline.model import kernels

    n_converted = mamba_layers(name)
    started = time.perf_counter()
    model = build(model_spec(name))  # random bf16 weights, on the GPU (smoke: the CPU)
    memory = Memory(args, model)
    search = largest_batch(model, args, memory, model_spec(name))
    batch = search["batch"]
    for _ in range(args.shrink):  # earlier attempts at this model ran out of memory (each in its own process)
        batch = max(1, int(batch * 0.9))
    try:
        record = measure(model, batch, args, search["prefill_batch"])
    except torch.OutOfMemoryError as error:  # a failed capture can leave CUDA unusable: the caller retries
        print(f"out of memory at batch {batch}: {str(error).splitlines()[0][:200]}", file=sys.stderr)
        sys.exit(3)
    mixer = MODELS[name][0] or "mamba"
    return {"model": name, "mixer": mixer, "n_converted": n_converted, "n_mamba": n_converted * (mixer == "mamba"),
            **record, "batch_search": search, "shrunk": args.shrink,
            "seconds": time.perf_counter() - started, "kernel_paths": kernels.paths_used()}


def run_model(name: str, argv: list[str]) -> dict:
    """One model in a process of its own; an attempt that runs out of memory is repeated at 90% of the batch."""
    for shrink in range(20):
        command = [sys.executable, __file__, *argv, "--single", name, "--shrink", str(shrink)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        if done.returncode != 3:
            raise SystemExit(f"{name}: the measurement failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        print(f"{name}: {done.stderr.strip().splitlines()[-1]}; again at 90% of the batch", flush=True)
    raise SystemExit(f"{name}: out of memory 20 times")


def workload(args) -> dict:
    return {"prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "levels": args.levels,
            "steps_per_level": args.steps, "prefill_batch": args.prefill_batch, "margin": args.margin,
            "shape": "smoke (throughput.py's)" if args.smoke else "Apriel-15B", "weights": "random, bf16"}


def teacher_record(path: str, expected_workload: dict, device: str) -> dict:
    """The teacher's record of an earlier run's JSON, refused in one line unless its workload and device are
    this run's (the name of the card is all that can be checked: run both on one machine, one after the other)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--teacher-from {path}: not a results file of this script ({error})")
    if earlier.get("workload") != expected_workload or earlier.get("device") != device:
        raise SystemExit(f"--teacher-from {path}: measured on {earlier.get('device')!r} with workload "
                         f"{earlier.get('workload')}, not this run's {device!r} / {expected_workload}")
    teacher = next((r for r in earlier.get("records", []) if r.get("n_converted", r.get("n_mamba")) == 0), None)
    if teacher is None:
        raise SystemExit(f"--teacher-from {path}: it holds no teacher record")
    return teacher


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.single:
        print(json.dumps(single(args.single, args)), flush=True)
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on the CPU")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    earlier_teacher = teacher_record(args.teacher_from, workload(args), device) if args.teacher_from else None
    started = time.perf_counter()
    records = []
    for name in args.models.split(","):
        record = run_model(name, argv)
        records.append(record)
        print(f"{name}: batch {record['batch']}, {record['total_tokens_per_s']:,.0f} generated tokens/s "
              f"({record['seconds']:.0f} s)", flush=True)
    teacher = next((r for r in records if r["n_converted"] == 0), None)
    if teacher is None and earlier_teacher is not None:
        teacher = dict(earlier_teacher, teacher_from=args.teacher_from)
        records.insert(0, teacher)
    for record in records:
        record["ratio_to_teacher"] = (record["total_tokens_per_s"] / teacher["total_tokens_per_s"] if teacher
                                      else float("nan"))
    result = {
        "workload": workload(args),
        "method": "integrated over fill levels (prefill scaled from one micro-batch); see definitions",
        "definitions": DEFINITIONS, "records": records,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "seconds": time.perf_counter() - started,
    }
    print(f"\n{'model':<9}{'batch':>7}{'prefill s':>11}{'decode s':>11}{'gen tok/s':>12}{'ratio':>8}")
    for r in records:
        print(f"{r['model']:<9}{r['batch']:>7}{r['prefill_s']:>11.2f}{r['decode_s']:>11.1f}"
              f"{r['total_tokens_per_s']:>12,.0f}{r['ratio_to_teacher']:>8.2f}")
    print(f"({args.prompt}-token prompts, {args.new_tokens} generated each; {time.perf_counter() - started:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
