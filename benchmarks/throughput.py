"""Generation throughput at the Apriel-15B shape: teacher vs H-25 / H-30 / H-40 through one engine.

Random bf16 weights (speed does not depend on them). For each total length (prompt + 512 generated
tokens) and each model: the largest batch whose static caches fit in GPU memory, prefill time, decode
tokens/s, total throughput, the ratio to the teacher, and the decode step's achieved HBM bandwidth
(bytes of weights + caches the step must move / step time) as a fraction of the card's peak. Also
transformers' `generate()` on the teacher (MistralForCausalLM at the same shape) as today's baseline.

Usage: python benchmarks/throughput.py --out results.json [--lengths 4096,16384] [--models 0,25,30,40]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
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
NEW_TOKENS = 512
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


def peak_bytes_per_s() -> float:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BYTES_PER_S.items():
        if key in name:
            return value
    raise SystemExit(f"no datasheet HBM bandwidth known for {name!r}: add it to PEAK_BYTES_PER_S")


def spread(n_mamba: int, n_layers: int) -> list[int]:
    """n_mamba layer indices spread evenly (which layers are Mamba does not matter for speed)."""
    return sorted({round(i * n_layers / n_mamba) for i in range(n_mamba)}) if n_mamba else []


def build(n_mamba: int, shape: dict = APRIEL_15B, device: str = "cuda",
          dtype: torch.dtype = torch.bfloat16) -> HybridForCausalLM:
    """A random-weight hybrid of `shape` with `n_mamba` Mamba layers spread over the depth (the teacher: 0)."""
    layers = spread(n_mamba, shape["num_hidden_layers"])
    types = ["mamba" if i in layers else "attention" for i in range(shape["num_hidden_layers"])]
    config = HybridConfig(**shape, layer_types=types)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HybridForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def measured_copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB, bytes read + written per second (the practical ceiling)."""
    src = torch.empty(2**31, dtype=torch.int16, device="cuda").random_()
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


def measure(model, n_mamba: int, total: int, batch: int, prefill_sample: int, profile: bool,
            plain: bool = False) -> dict:
    prompt = total - NEW_TOKENS
    engine = GenerationEngine(model, batch_size=batch, max_length=total, prefill_batch=1,
                              fused=False if plain else None)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    # Prefill is compute-bound and linear in the batch: it runs for real on `prefill_sample` sequences
    # and its time is scaled to the batch; the other rows' caches keep zeros (decode speed does not
    # depend on cache values). Decode runs for real on the whole batch.
    sample = min(prefill_sample, batch)
    engine._prefill(ids[:1, :256], torch.ones(1, 256, dtype=torch.long, device="cuda"))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = engine._prefill(ids[:sample], torch.ones(sample, prompt, dtype=torch.long, device="cuda"))
    torch.cuda.synchronize()
    prefill_s = (time.perf_counter() - start) * batch / sample
    engine.tokens[:sample] = first
    engine.positions.fill_(prompt)
    engine.slot.fill_(prompt)
    engine.key_valid[:, :prompt] = True
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine._decode_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80), flush=True)
        engine.positions.fill_(prompt)  # the profiled steps advanced the state: start again
        engine.slot.fill_(prompt)
        engine.key_valid[:, prompt:] = False
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        engine._run_step()
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - start
    step_s = decode_s / (NEW_TOKENS - 1)
    # The K/V columns a step must read grow from prompt + 1 to total - 1: count their mean.
    step_bytes = engine.bytes_per_decode_step(length=prompt + NEW_TOKENS / 2)
    return {
        "model": "teacher" if n_mamba == 0 else f"H-{n_mamba}",
        "n_mamba": n_mamba,
        "total_len": total,
        "prompt_len": prompt,
        "new_tokens": NEW_TOKENS,
        "batch": batch,
        "prefill_s": prefill_s,
        "prefill_measured_sequences": sample,
        "decode_s": decode_s,
        "decode_step_ms": step_s * 1e3,
        "tokens_per_s": batch / step_s,  # generation (decode) throughput
        "total_tokens_per_s": batch * NEW_TOKENS / (prefill_s + decode_s),  # prefill + 512 tokens
        "bytes_per_step": step_bytes,
        "hbm_fraction": step_bytes / step_s / peak_bytes_per_s(),
        "fused_decode": engine.fused,
        "cache_gib": engine.cache_bytes() / 2**30,
        "cuda_graph": engine.graph is not None,
    }


def cache_bytes_per_sequence(n_mamba: int, total: int, shape: dict = APRIEL_15B) -> int:
    """Static cache bytes of one sequence (as GenerationEngine allocates them, bf16), without allocating."""
    c = shape
    n_attention = c["num_hidden_layers"] - n_mamba
    kv = n_attention * 2 * c["num_key_value_heads"] * c["head_dim"] * total * 2
    states = n_mamba * (c["mamba_d_inner"] * c["mamba_d_conv"] * 2 + c["mamba_d_inner"] * c["mamba_d_state"] * 4)
    return kv + states


def run_engine(n_mamba: int, total: int, args) -> dict:
    """Each attempt in a fresh process (an out-of-memory attempt leaves nothing behind); the batch starts
    from free memory / per-sequence cache and shrinks by 10% until it fits."""
    import subprocess
    import sys

    weights = 31e9  # bf16 weights of either model, rounded up
    free = torch.cuda.mem_get_info()[0]
    batch = max(int((free - weights - args.reserve_gib * 2**30) // cache_bytes_per_sequence(n_mamba, total)), 1)
    if args.batch:
        batch = args.batch
    while batch >= 1:
        print(f"  {'teacher' if n_mamba == 0 else f'H-{n_mamba}'} at {total}: trying batch {batch}", flush=True)
        command = [sys.executable, __file__, "--single", f"{n_mamba},{total},{batch}",
                   "--prefill-sample", str(args.prefill_sample)] + (["--profile"] if args.profile else []) + (
                   ["--plain"] if args.plain else [])
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            print("\n".join(l for l in done.stdout.splitlines() if not l.startswith("{")), flush=True)
            return json.loads(lines[-1])
        if done.returncode != 3:
            raise RuntimeError(f"measurement failed (exit {done.returncode}): {done.stderr[-2000:]}")
        batch = int(batch * 0.9)
    raise RuntimeError("not even one sequence fits")


def single(spec: str, prefill_sample: int, profile: bool, plain: bool) -> None:
    n_mamba, total, batch = (int(v) for v in spec.split(","))
    model = build(n_mamba)
    try:
        record = measure(model, n_mamba, total, batch, prefill_sample, profile, plain)
    except torch.OutOfMemoryError as error:
        print(f"out of memory: {str(error).splitlines()[0][:200]}", file=sys.stderr)
        sys.exit(3)
    record["kernel_paths"] = kernels.paths_used()
    print(json.dumps(record), flush=True)


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
    ids = torch.randint(3, config.vocab_size, (batch, prompt), device="cuda")
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
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # n_mamba,total,batch: one attempt
    args = parser.parse_args()
    if args.single:
        single(args.single, args.prefill_sample, args.profile, args.plain)
        return
    lengths = [int(v) for v in args.lengths.split(",")]
    records, baselines = [], []
    copy_bw = measured_copy_bandwidth()
    gc.collect()
    torch.cuda.empty_cache()
    print(f"device {torch.cuda.get_device_name()}, measured copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    for n_mamba in (int(v) for v in args.models.split(",")):
        for total in lengths:
            record = run_engine(n_mamba, total, args)
            record["hbm_fraction_of_measured_copy"] = record["bytes_per_step"] / (record["decode_step_ms"] / 1e3) / copy_bw
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "kernel_paths"}), flush=True)
    for record in records:
        teacher = next((r for r in records if r["n_mamba"] == 0 and r["total_len"] == record["total_len"]), None)
        if teacher is None:  # --models without 0: no ratios
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
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "transformers": transformers.__version__, "measured_copy_bytes_per_s": copy_bw,
        "peak_bytes_per_s": peak_bytes_per_s(),
        "kernel_paths": records[0].get("kernel_paths") if records else None,
        "definitions": DEFINITIONS, "records": records, "transformers_baseline": baselines,
    }
    print(f"\n{'model':<8}{'len':>7}{'batch':>7}{'prefill s':>11}{'decode tok/s':>14}{'total':>10}{'ratio':>8}{'hbm':>7}")
    for r in records:
        print(f"{r['model']:<8}{r['total_len']:>7}{r['batch']:>7}{r['prefill_s']:>11.2f}{r['tokens_per_s']:>14.0f}"
              f"{r['total_tokens_per_s']:>10.0f}{r['ratio_to_teacher']:>8.2f}{r['hbm_fraction']:>7.2f}")
    for b in baselines:
        print(f"transformers generate: len {b['total_len']} batch {b['batch']}: decode {b['decode_tokens_per_s']:.0f} tok/s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
