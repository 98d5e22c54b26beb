"""Generation throughput at the Apriel-15B shape: teacher vs H-25 / H-30 / H-40 through one engine.

Random bf16 weights (speed does not depend on them). For each total length (prompt + 512 generated
tokens) and each model: the largest batch whose static caches fit in GPU memory, prefill time, decode
tokens/s, total throughput, the ratio to the teacher, and the decode step's achieved HBM bandwidth
(bytes of weights + caches the step must move / step time) as a fraction of the card's peak. Also
transformers' `generate()` on the teacher (MistralForCausalLM at the same shape) as today's baseline.

Models (`--models`): 0 = the teacher; K = H-K with Mamba-1 layers; gdnK = H-K with Gated DeltaNet layers;
mixK = H-K with both, alternating over the converted layers (the per-layer choice: for speed only how
many of each kind counts, not which layers). Each model runs in a process of its own, which measures every
length (a batch that runs out of memory is retried 10% smaller in the same process); a process that fails
is reported and the next model runs. `--decode-steps N` times N decode steps in the middle of the 512 (the
mean cache length of the whole decode) and scales them to 511; the default times all 511.

Usage: python benchmarks/throughput.py --out results.json [--lengths 4096,16384] [--models 0,25,30,40]
       python benchmarks/throughput.py --models 0,25,30,40,gdn25,gdn30,gdn40,mix25,mix30,mix40 \
           --decode-steps 64 --prefill-sample 1 --skip-baseline --out gdn-throughput.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import sys
import time

import torch
import transformers

from pipeline.evaluate.engine import GenerationEngine
from pipeline.model import HybridConfig, HybridForCausalLM
from pipeline.model import kernels

APRIEL_15B = dict(
    vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=50, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    mamba_d_state=16, mamba_dt_rank=16, mamba_d_conv=4, mamba_d_inner=4096, mamba_d_xb=1024,
)
# `--smoke`: the same code on the CPU at a tiny shape with the PyTorch reference kernels (a check that the
# script runs before GPU time is spent on it; its figures mean nothing).
SMOKE = "--smoke" in sys.argv
if SMOKE:
    APRIEL_15B = dict(APRIEL_15B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_d_inner=128, mamba_d_xb=64)
DEVICE = "cpu" if SMOKE else "cuda"
NEW_TOKENS = 512
DECODE_WARM_STEPS = 4  # the engine's 2 warm-up steps, its graph capture, one replay
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet HBM bandwidth (SXM parts)


DEFINITIONS = {
    "tokens_per_s": "decode (generation) tokens/s of the whole batch: batch / decode step time",
    "ratio_to_teacher": "tokens_per_s / the teacher's tokens_per_s at the same total length",
    "total_tokens_per_s": "batch * 512 / (prefill time + decode time): a prompt of total_len - 512 then 512 tokens",
    "total_ratio_to_teacher": "total_tokens_per_s / the teacher's",
    "bytes_per_step": "weights (embedding rows only) + the K/V columns filled so far (their mean over the "
                      "decode steps) + Mamba conv/SSM states read and written",
    "hbm_fraction": "bytes_per_step / decode step time / the card's datasheet HBM bandwidth (peak_bytes_per_s)",
    "hbm_fraction_of_measured_copy": "the same over the measured device-to-device copy bandwidth",
}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"


def peak_bytes_per_s() -> float:
    if SMOKE:
        return 1.0
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BYTES_PER_S.items():
        if key in name:
            return value
    raise SystemExit(f"no datasheet HBM bandwidth known for {name!r}: add it to PEAK_BYTES_PER_S")


def spread(n_mamba: int, n_layers: int) -> list[int]:
    """n_mamba layer indices spread evenly (which layers are Mamba does not matter for speed)."""
    return sorted({round(i * n_layers / n_mamba) for i in range(n_mamba)}) if n_mamba else []


def parse_model(spec: str) -> tuple[str, int]:
    """"0" -> ("mamba", 0) the teacher; "30" -> Mamba H-30; "gdn30" -> Gated DeltaNet H-30; "mix30" -> both."""
    match = re.fullmatch(r"(gdn|mix)?(\d+)", spec.strip())
    if match is None:
        raise SystemExit(f"--models: {spec!r} is not K, gdnK or mixK")
    return match.group(1) or "mamba", int(match.group(2))


def layer_types(spec: str) -> list[str]:
    kind, count = parse_model(spec)
    layers = spread(count, APRIEL_15B["num_hidden_layers"])
    mixers = {layer: ("gdn" if kind == "gdn" or (kind == "mix" and position % 2 == 0) else "mamba")
              for position, layer in enumerate(layers)}
    return [mixers.get(i, "attention") for i in range(APRIEL_15B["num_hidden_layers"])]


def model_name(spec: str) -> str:
    kind, count = parse_model(spec)
    if count == 0:
        return "teacher"
    return f"H-{count}" + {"mamba": "", "gdn": "-GDN", "mix": "-mix"}[kind]


def build(spec) -> HybridForCausalLM:
    config = HybridConfig(**APRIEL_15B, layer_types=layer_types(str(spec)))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = HybridForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def measured_copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB, bytes read + written per second (the practical ceiling)."""
    if SMOKE:
        return 1.0
    src = torch.empty(2**31, dtype=torch.int16, device=DEVICE).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**32 / sorted(times)[len(times) // 2]


def measure(model, spec, total: int, batch: int, prefill_sample: int, profile: bool,
            plain: bool = False, decode_steps: int = NEW_TOKENS - 1, full_warmup: bool = False,
            decode_repeats: int = 3) -> dict:
    spec = str(spec)
    n_mamba = parse_model(spec)[1]
    prompt = total - NEW_TOKENS
    engine = GenerationEngine(model, batch_size=batch, max_length=total, prefill_batch=1,
                              fused=False if plain else None)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=DEVICE)
    # Prefill is compute-bound and linear in the batch: it runs for real on `prefill_sample` sequences
    # and its time is scaled to the batch; the other rows' caches keep zeros (decode speed does not
    # depend on cache values). Decode runs for real on the whole batch.
    sample = min(prefill_sample, batch)
    warm = prompt if full_warmup else 256  # full: Triton kernels tuned for the measured length stay out of it
    engine._prefill(ids[:1, :warm], torch.ones(1, warm, dtype=torch.long, device=DEVICE))  # warm-up
    sync()
    start = time.perf_counter()
    first = engine._prefill(ids[:sample], torch.ones(sample, prompt, dtype=torch.long, device=DEVICE))
    sync()
    prefill_s = (time.perf_counter() - start) * batch / sample
    engine.tokens[:sample] = first
    # Fewer steps than 511: the middle ones, so the cache length they see is the whole decode's mean.
    start_at = prompt + max((NEW_TOKENS - 1 - decode_steps) // 2, 0)
    engine.positions.fill_(start_at)
    engine.slot.fill_(start_at)
    engine.key_valid[:, :start_at] = True
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine._decode_step()
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80), flush=True)
    # The engine's first decode steps compile Triton kernels (autotuning included) and capture the CUDA graph,
    # which takes seconds (benchmarks/results/gdn-h200.md): they run first, untimed; each timed round then
    # starts again at start_at.
    for _ in range(DECODE_WARM_STEPS):
        engine._run_step()
    sync()
    step_times = []
    for _ in range(decode_repeats):
        engine.positions.fill_(start_at)
        engine.slot.fill_(start_at)
        engine.key_valid[:, start_at:] = False
        sync()
        start = time.perf_counter()
        for _ in range(decode_steps):
            engine._run_step()
        sync()
        step_times.append((time.perf_counter() - start) / decode_steps)
    step_s = sorted(step_times)[len(step_times) // 2]  # the median round
    decode_s = step_s * (NEW_TOKENS - 1)  # the 511 steps of a 512-token generation
    # The K/V columns a step must read grow from prompt + 1 to total - 1: count their mean.
    step_bytes = engine.bytes_per_decode_step(length=prompt + NEW_TOKENS / 2)
    kinds = model.config.layer_types
    return {
        "model": model_name(spec),
        "spec": spec,
        "n_mamba": n_mamba,  # converted layers (Mamba and Gated DeltaNet): the K of H-K
        "n_mamba_layers": kinds.count("linear_attention"),
        "n_gdn_layers": kinds.count("gated_delta_net"),
        "decode_steps_timed": decode_steps,
        "total_len": total,
        "prompt_len": prompt,
        "new_tokens": NEW_TOKENS,
        "batch": batch,
        "prefill_s": prefill_s,
        "prefill_measured_sequences": sample,
        "decode_s": decode_s,
        "decode_step_ms": step_s * 1e3,
        "decode_step_ms_rounds": [round(t * 1e3, 3) for t in step_times],  # each timed round; the median is used
        "tokens_per_s": batch / step_s,  # generation (decode) throughput
        "total_tokens_per_s": batch * NEW_TOKENS / (prefill_s + decode_s),  # prefill + 512 tokens
        "bytes_per_step": step_bytes,
        "hbm_fraction": step_bytes / step_s / peak_bytes_per_s(),
        "fused_decode": engine.fused,
        "cache_gib": engine.cache_bytes() / 2**30,
        "cuda_graph": engine.graph is not None,
    }


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure, whichever layer raised it: the caching allocator (OutOfMemoryError), or cuBLAS
    handle and CUDA stream creation once the allocator has taken the rest (RuntimeError / AcceleratorError)."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def cache_bytes_per_sequence(spec, total: int) -> int:
    """Static cache bytes of one sequence (as GenerationEngine allocates them), without allocating."""
    c = APRIEL_15B
    kinds = layer_types(str(spec))
    kv = kinds.count("attention") * 2 * c["num_key_value_heads"] * c["head_dim"] * total * 2
    states = kinds.count("mamba") * (c["mamba_d_inner"] * c["mamba_d_conv"] * 2
                                     + c["mamba_d_inner"] * c["mamba_d_state"] * 4)
    heads, kv_heads, dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    states += kinds.count("gdn") * ((heads + 2 * kv_heads) * dim * 4 * 2 + heads * dim * dim * 4)  # conv + state
    return kv + states


def first_batch(spec, total: int, args) -> int:
    """The largest batch the free memory holds beside the weights and a reserve (or --batch)."""
    if args.batch:
        return args.batch
    if SMOKE:
        return 4
    weights = 31e9  # bf16 weights of any of these models, rounded up
    free = torch.cuda.mem_get_info()[0]
    return max(int((free - weights - args.reserve_gib * 2**30) // cache_bytes_per_sequence(spec, total)), 1)


def run_model(spec: str, lengths: list[int], args) -> list[dict]:
    """One model at every length in a fresh process; a process that fails is one line, and its missing
    lengths are records with an `error`, so the models after it still run."""
    import subprocess

    batches = ",".join(str(first_batch(spec, total, args)) for total in lengths)
    command = [sys.executable, __file__, "--model-process", spec, "--lengths", ",".join(map(str, lengths)),
               "--batches", batches, "--prefill-sample", str(args.prefill_sample),
               "--decode-steps", str(args.decode_steps), "--decode-repeats", str(args.decode_repeats)]
    command += (["--profile"] if args.profile else []) + (["--plain"] if args.plain else [])
    command += ["--full-warmup"] if args.full_warmup else []
    command += ["--smoke"] if SMOKE else []
    print(f"  {model_name(spec)}: batches {batches} at lengths {lengths}", flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.model_timeout)
    except subprocess.TimeoutExpired as expired:  # what it measured before the limit still counts
        def text(value):
            return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")

        done = subprocess.CompletedProcess(command, "timeout", text(expired.stdout),
                                           text(expired.stderr) + f"\nran past --model-timeout {args.model_timeout} s")
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("{")), flush=True)
    if done.returncode != 0:
        print(f"  FAILED {model_name(spec)} (exit {done.returncode}): {done.stderr.strip()[-1500:]}", flush=True)
    measured = {record["total_len"] for record in records}
    last_line = done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else ""
    records += [{"model": model_name(spec), "spec": spec, "total_len": total, "n_mamba": parse_model(spec)[1],
                 "error": f"exit {done.returncode}: {last_line}"} for total in lengths if total not in measured]
    return records


def model_process(spec: str, lengths: list[int], batches: list[int], args) -> None:
    """The child: build the model once, measure each length, shrinking a batch that runs out of memory."""
    model = build(spec)
    for total, batch in zip(lengths, batches):
        while True:
            try:
                record = measure(model, spec, total, batch, args.prefill_sample, args.profile, args.plain,
                                 args.decode_steps, args.full_warmup, args.decode_repeats)
                break
            except RuntimeError as error:  # OutOfMemoryError and AcceleratorError are RuntimeErrors too
                if not is_out_of_memory(error) or int(batch * 0.9) < 1:
                    raise
                reason = str(error).splitlines()[0][:120]
            # Out of the handler: the exception's traceback holds the failed attempt's frames (its engine and
            # caches), so memory freed inside the handler stays taken and the retry would fail again.
            print(f"  {model_name(spec)} at {total}: batch {batch} out of memory ({reason}); "
                  f"retrying at {int(batch * 0.9)}", flush=True)
            empty_cache()
            batch = int(batch * 0.9)
        record["kernel_paths"] = kernels.paths_used()
        empty_cache()
        print(json.dumps(record), flush=True)


def single(spec: str, prefill_sample: int, profile: bool, plain: bool) -> None:
    n_mamba, total, batch = (v for v in spec.split(","))
    model = build(n_mamba)
    try:
        record = measure(model, n_mamba, int(total), int(batch), prefill_sample, profile, plain)
    except torch.OutOfMemoryError as error:
        print(f"out of memory: {str(error).splitlines()[0][:200]}", file=sys.stderr)
        sys.exit(3)
    record["kernel_paths"] = kernels.paths_used()
    print(json.dumps(record), flush=True)


def check_kernels(record: dict) -> None:
    """A loud line when a model ran a PyTorch reference where a CUDA kernel was meant to run."""
    fallbacks = {op: paths for op, paths in (record.get("kernel_paths") or {}).items()
                 if any("reference" in path or "PyTorch" in path for path in paths)
                 and op in ("gated_delta_rule", "gated_delta_rule_step", "selective_scan", "mamba_decode_step")}
    if fallbacks:
        print(f"  WARNING {record['model']} at {record['total_len']}: reference kernels ran: {fallbacks}", flush=True)


def run_transformers_baseline(total: int, batch: int, new_tokens: int) -> dict:
    """transformers' generate() on a MistralForCausalLM teacher at the same shape (today's user path)."""
    from transformers import MistralConfig, MistralForCausalLM

    fields = {k: v for k, v in APRIEL_15B.items() if not k.startswith("mamba_")}
    config = MistralConfig(**fields, sliding_window=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = MistralForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    prompt = total - NEW_TOKENS
    ids = torch.randint(3, config.vocab_size, (batch, prompt), device=DEVICE)
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **settings)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        torch.cuda.synchronize()
        both_s = time.perf_counter() - start
    decode_s = both_s - prefill_s
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": "teacher (transformers generate)", "n_mamba": 0, "total_len": total, "batch": batch,
            "new_tokens": new_tokens, "prefill_s": prefill_s,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "tokens_per_s_at_512_new": batch * NEW_TOKENS / (prefill_s + decode_s / (new_tokens - 1) * (NEW_TOKENS - 1))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--models", default="0,25,30,40")
    parser.add_argument("--prefill-sample", type=int, default=2)
    parser.add_argument("--reserve-gib", type=float, default=10.0)
    parser.add_argument("--baseline-new-tokens", type=int, default=64)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a decode step")
    parser.add_argument("--plain", action="store_true", help="the engine's plain-PyTorch decode step (no Triton)")
    parser.add_argument("--batch", type=int, default=None, help="this batch for every model instead of the largest")
    parser.add_argument("--decode-steps", type=int, default=NEW_TOKENS - 1,
                        help="decode steps timed (the middle of the 512), scaled to 511")
    parser.add_argument("--decode-repeats", type=int, default=3,
                        help="timed rounds of --decode-steps after the untimed warm-up steps; the median is used")
    parser.add_argument("--full-warmup", action="store_true",
                        help="warm the prefill up at the measured length (Triton autotuning out of the timing)")
    parser.add_argument("--model-timeout", type=float, default=600.0, help="seconds a model's process may take")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, reference kernels: the script runs")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # model,total,batch: one attempt
    parser.add_argument("--model-process", default=None, help=argparse.SUPPRESS)  # one model, every length
    parser.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        single(args.single, args.prefill_sample, args.profile, args.plain)
        return
    lengths = [int(v) for v in args.lengths.split(",")]
    if args.model_process:
        model_process(args.model_process, lengths, [int(v) for v in args.batches.split(",")], args)
        return
    records, baselines = [], []
    copy_bw = measured_copy_bandwidth()
    empty_cache()
    print(f"device {device_name()}, measured copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    for spec in args.models.split(","):
        parse_model(spec)
        for record in run_model(spec, lengths, args):
            if "error" not in record:
                record["hbm_fraction_of_measured_copy"] = (record["bytes_per_step"] / (record["decode_step_ms"] / 1e3)
                                                           / copy_bw)
                check_kernels(record)
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "kernel_paths"}), flush=True)
    for record in records:
        teacher = next((r for r in records if r["n_mamba"] == 0 and r["total_len"] == record["total_len"]
                        and "error" not in r), None)
        if teacher is None or "error" in record:  # --models without 0, or a failed measurement: no ratios
            record["ratio_to_teacher"] = record["total_ratio_to_teacher"] = float("nan")
            continue
        record["ratio_to_teacher"] = record["tokens_per_s"] / teacher["tokens_per_s"]
        record["total_ratio_to_teacher"] = record["total_tokens_per_s"] / teacher["total_tokens_per_s"]
    if not args.skip_baseline:
        for total, batch in ((4096, 16), (16384, 4)):
            if total in lengths:
                baselines.append(run_transformers_baseline(total, batch, args.baseline_new_tokens))
                print(json.dumps(baselines[-1]), flush=True)
    result = {
        "device": device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "transformers": transformers.__version__, "measured_copy_bytes_per_s": copy_bw,
        "peak_bytes_per_s": peak_bytes_per_s(),
        "kernel_paths": records[0].get("kernel_paths") if records else None,
        "definitions": DEFINITIONS, "records": records, "transformers_baseline": baselines,
        "command": " ".join(sys.argv),
    }
    print(f"\n{'model':<11}{'len':>7}{'batch':>7}{'prefill s':>11}{'decode tok/s':>14}{'ratio':>7}{'total':>9}"
          f"{'total ratio':>12}{'hbm':>6}")
    for r in records:
        if "error" in r:
            print(f"{r['model']:<11}{r['total_len']:>7}  FAILED: {r['error']}")
            continue
        print(f"{r['model']:<11}{r['total_len']:>7}{r['batch']:>7}{r['prefill_s']:>11.2f}{r['tokens_per_s']:>14.0f}"
              f"{r['ratio_to_teacher']:>7.2f}{r['total_tokens_per_s']:>9.0f}{r['total_ratio_to_teacher']:>12.2f}"
              f"{r['hbm_fraction']:>6.2f}")
    for b in baselines:
        print(f"transformers generate: len {b['total_len']} batch {b['batch']}: decode {b['decode_tokens_per_s']:.0f} tok/s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
