"""FSDP2 against the plain loop, 1 and 2 GPUs, the largest pair one GPU trains, and a resharded resume.

Everything goes through `pipeline.train.train` bare (no prefect/mlflow/hydra/boto3). Student: a Llama-shaped
hybrid with every other layer Mamba (default size "1b": TinyLlama-1.1B shape, as benchmarks/train_throughput.py),
distilled (reverse KL, bf16-mixed: fp32 master weights, bf16 autocast, teacher held in bf16) from a teacher of
the same shape with every layer attention, on random tokens that depend only on the micro-batch position, so
every run sees the same data. One step = `--accum` micro-batches of `--micro-batch` sequences of `--seq`
tokens: the GLOBAL batch, the same for any number of processes (each rank trains its share of it).

`all` (the driver) runs, each in its own process, within `--budget-s`:
  plain-1   the plain single-process loop (no process group);
  fsdp-1    the FSDP2 path under `torchrun --nproc-per-node 1`;
  fsdp-2    the FSDP2 path on 2 processes (when `--nproc-max` >= 2), the same global batch;
  resume    fsdp on 2 processes for `--resume-at` steps saving a DCP state, then 1 process to the end
            (2 -> 1 resharded resume); its last loss against fsdp-2's (and fsdp-1's) uninterrupted one;
  probe     per size (Llama shapes: 1b, 3b, 7b, 8b, 13b, 15b = the Apriel-15B shape), a few steps on ONE
            process with activation checkpointing, first without, then with `cpu_offload` (FSDP2 CPU
            offload of the student's shards and AdamW); sizes ascend and stop at the first failure.
Per run: loss curve, tokens/s (median step after `--warmup` steps), MFU (model FLOPs of the student's
forward + backward and the teacher's forward, as train_throughput.py, over time x 989e12 x GPUs), peak GPU
memory (max over ranks) and peak host RSS.

Output (`--out`): one JSON with command, device, date, settings and every run; beside it
`fsdp-h200.json` (the 1-GPU part) and `multi-gpu-h200x2.json` (distill_tokens_per_s, final_loss, resumed_ok).
NCCL's NVLink multicast is kept off (NCCL_NVLS_ENABLE=0) in every launched process.

  PYTHONPATH=$PWD python benchmarks/fsdp_throughput.py all --out $OUT/fsdp.json
  (CPU wiring check: --device cpu --size tiny --seq 64 --micro-batch 2 --accum 2 --steps 4 --resume-at 2
   --probe-sizes tiny --probe-offload-sizes tiny)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PEAK_FLOPS = 989e12  # H100 / H200 SXM dense bf16
# Llama shapes (hidden, layers, heads, kv heads, head dim, MLP, vocabulary)
SHAPES = {
    "tiny": (64, 4, 4, 2, 16, 128, 256),
    "1b": (2048, 22, 32, 4, 64, 5632, 32000),  # TinyLlama-1.1B
    "3b": (3072, 28, 24, 8, 128, 8192, 128256),  # Llama-3.2-3B
    "7b": (4096, 32, 32, 32, 128, 11008, 32000),  # Llama-2-7B
    "8b": (4096, 32, 32, 8, 128, 14336, 128256),  # Llama-3-8B
    "13b": (5120, 40, 40, 40, 128, 13824, 32000),  # Llama-2-13B
    "15b": (5120, 50, 32, 8, 128, 14336, 131072),  # Apriel-Nemotron-15B (the recipe's teacher)
}


def hybrid_config(size: str, pattern: list[str], seq: int):
    from pipeline.model import HybridConfig

    hidden, layers, heads, kv, head_dim, mlp, vocab = SHAPES[size]
    return HybridConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                        max_position_embeddings=max(seq, 2048), layer_types=pattern)


def flops_per_token(model, seq: int, passes: int) -> float:
    """passes: 1 = forward, 3 = forward + backward. 2 FLOPs per MAC of every weight matrix (embeddings
    excluded) plus causal attention's scores and values (as benchmarks/train_throughput.py)."""
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
    attention = len(model.config.attention_layers) * 2 * seq * model.config.num_attention_heads * model.config.head_dim
    return passes * (2 * weights + 2 * attention)


# --- one run (a plain process, or every rank under torchrun) -----------------------------------------

def worker(job: dict) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.model import HybridForCausalLM
    from pipeline.train import TrainConfig, train
    from pipeline.train.distributed import init_process_group, rank_and_world

    fsdp = "WORLD_SIZE" in os.environ
    device = init_process_group(job["device"]) if fsdp else torch.device(job["device"])
    rank, world = rank_and_world()
    seq, layers = job["seq"], SHAPES[job["size"]][1]
    vocab = SHAPES[job["size"]][6]
    record = {"name": job["name"], "path": "fsdp" if fsdp else "plain", "processes": world, "size": job["size"],
              "activation_checkpointing": job["activation_checkpointing"], "cpu_offload": job["cpu_offload"]}
    student_pattern = ["mamba" if i % 2 else "attention" for i in range(layers)]
    try:
        if job["cpu_offload"]:  # the student's fp32 shards, gradients and two AdamW moments in host memory
            with torch.device("meta"):
                count = sum(p.numel() for p in HybridForCausalLM(hybrid_config(job["size"], student_pattern, seq))
                            .parameters())
            needed, available = 16 * count / 2**30, _available_host_gib()
            if needed > 0.85 * available:
                raise MemoryError(f"host memory: cpu_offload needs about {needed:.0f} GiB, "
                                  f"{available:.0f} GiB available")
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # the frozen teacher is held in bf16 (built so: no fp32 copy)
        try:
            with torch.device(device):
                teacher = HybridForCausalLM(hybrid_config(job["size"], ["attention"] * layers, seq)).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        torch.manual_seed(1)
        with torch.device(device):  # fp32 master weights
            student = HybridForCausalLM(hybrid_config(job["size"], student_pattern, seq))
        tokens = job["micro_batch"] * job["accum"] * seq
        student_flops = tokens * flops_per_token(student, seq, 3)
        teacher_flops = tokens * flops_per_token(teacher, seq, 1)
        record.update(student_params=sum(p.numel() for p in student.parameters()),
                      teacher_params=sum(p.numel() for p in teacher.parameters()))

        def batches(position: int):
            while True:
                generator = torch.Generator().manual_seed(1000 + position)
                yield {"input_ids": torch.randint(0, vocab, (job["micro_batch"], seq), generator=generator)}
                position += 1

        cfg = TrainConfig(steps=job["steps"], lr=job["lr"], warmup_steps=min(2, job["steps"]),
                          batch_size=job["micro_batch"], max_length=seq, grad_accum=job["accum"], trainable="all",
                          loss="reverse_kl", kl_chunk_tokens=4096, log_every=1, compile_blocks=job["compile"],
                          activation_checkpointing=job["activation_checkpointing"], cpu_offload=job["cpu_offload"])
        curve: dict[int, float] = {}
        times: dict[int, float] = {}

        def callback(metrics):
            curve[metrics.step], times[metrics.step] = metrics.loss, metrics.step_time_s

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = train(student, batches, cfg, teacher=teacher, state_dir=job.get("state_dir"), callback=callback,
                       precision="bf16-mixed", max_steps_this_call=job.get("max_steps"))
        wall = time.perf_counter() - start
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=device)
        if fsdp:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        measured = sorted(times[step] for step in times if step > job["warmup"]) or sorted(times.values())
        step_s = measured[len(measured) // 2] if measured else float("nan")
        record.update(
            ok=True, steps_done=result.steps_done, steps_this_call=result.steps_this_call, wall_s=wall,
            loss_curve={str(step): loss for step, loss in sorted(curve.items())},
            last_loss=curve[max(curve)] if curve else None, final_loss_window=result.final_loss,
            step_s=step_s, tokens_per_step=tokens, tokens_per_s=tokens / step_s,
            model_tflops_per_step=(student_flops + teacher_flops) / 1e12,
            mfu=(student_flops + teacher_flops) / step_s / (PEAK_FLOPS * world),
            student_mfu=student_flops / step_s / (PEAK_FLOPS * world),
            peak_memory_gib=float(peak[0]), peak_host_rss_gib=float(peak[1]),
            state_path=str(result.state_path) if result.state_path else None,
        )
    except (torch.OutOfMemoryError, MemoryError) as exc:
        record.update(ok=False, error=f"out of memory: {str(exc).splitlines()[0][:200]}",
                      peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    finally:
        if rank == 0:
            Path(job["result"]).write_text(json.dumps(record))
        if fsdp:
            dist.destroy_process_group()


def _available_host_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


# --- the driver ----------------------------------------------------------------------------------

def launch(job: dict, nproc: int | None, folder: Path, timeout: float) -> dict:
    """Run one job: a plain process (nproc None) or torchrun with nproc processes; its record."""
    job = dict(job, result=str(folder / f"{job['name']}.result.json"))
    job_file = folder / f"{job['name']}.job.json"
    job_file.write_text(json.dumps(job))
    entry = [str(Path(__file__).resolve()), "worker", str(job_file)]
    if nproc is None:
        command = [sys.executable, *entry]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc-per-node", str(nproc), *entry]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {job['name']}: {' '.join(command[1:])}", flush=True)
    log_path = folder / f"{job['name']}.log"
    with open(log_path, "w") as log:  # its own session: a timeout ends torchrun and its ranks together
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout (the --budget-s ran out)"
    tail = log_path.read_text(errors="replace")[-3000:]
    if Path(job["result"]).is_file():
        record = json.loads(Path(job["result"]).read_text())
    else:
        record = {"name": job["name"], "ok": False, "error": f"exit {code}", "log_tail": tail}
    if code != 0 and record.get("ok"):
        record.update(ok=False, error=f"exit {code}", log_tail=tail)
    record["launch_s"] = time.perf_counter() - start
    summary = {key: record.get(key) for key in ("ok", "tokens_per_s", "mfu", "peak_memory_gib", "last_loss", "error")}
    print(f"[{time.strftime('%H:%M:%S')}] {job['name']}: {json.dumps(summary)}", flush=True)
    if not record.get("ok"):
        print(record.get("log_tail", ""), flush=True)
    return record


def drive(args: argparse.Namespace) -> None:
    import torch

    started = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    base = dict(device=args.device, size=args.size, seq=args.seq, micro_batch=args.micro_batch, accum=args.accum,
                steps=args.steps, lr=args.lr, warmup=args.warmup, compile=args.compile,
                activation_checkpointing=args.activation_checkpointing, cpu_offload=False)
    runs: dict[str, dict] = {}
    probe: list[dict] = []
    resume: dict = {}
    with tempfile.TemporaryDirectory(prefix="fsdp-bench-", dir=args.work_dir) as scratch:
        folder = Path(scratch)
        if "plain" in args.runs:
            runs["plain-1"] = launch(dict(base, name="plain-1"), None, folder, left())
        if "fsdp" in args.runs:
            runs["fsdp-1"] = launch(dict(base, name="fsdp-1"), 1, folder, left())
            if args.nproc_max >= 2:
                runs["fsdp-2"] = launch(dict(base, name="fsdp-2"), 2, folder, left())
        if "resume" in args.runs and args.nproc_max >= 2:
            state_dir = str(folder / "resume-state")
            first = launch(dict(base, name="resume-2-first", state_dir=state_dir, max_steps=args.resume_at), 2,
                           folder, left())
            second = launch(dict(base, name="resume-1-rest", state_dir=state_dir), 1, folder, left()) \
                if first.get("ok") else {"ok": False, "error": "first part failed"}
            reference = runs.get("fsdp-2", {})
            resume = {"stop_after_step": args.resume_at, "first": first, "rest": second,
                      "tolerance_rel": args.resume_rtol}
            if second.get("ok") and reference.get("ok"):
                final, expected = second["last_loss"], reference["last_loss"]
                resume.update(final_loss=final, uninterrupted_final_loss=expected,
                              rel_diff=abs(final - expected) / abs(expected),
                              rel_diff_1_vs_2_gpus=(abs(runs["fsdp-1"]["last_loss"] - expected) / abs(expected)
                                                    if runs.get("fsdp-1", {}).get("ok") else None),
                              resumed_ok=second["steps_done"] == args.steps
                              and abs(final - expected) <= args.resume_rtol * abs(expected))
            else:
                resume["resumed_ok"] = False
        if "probe" in args.runs:
            for offload, sizes in ((False, args.probe_sizes), (True, args.probe_offload_sizes)):
                for size in filter(None, sizes.split(",")):
                    if left() < args.probe_min_s:
                        probe.append({"size": size, "cpu_offload": offload, "ok": None,
                                      "error": "skipped: time budget"})
                        continue
                    job = dict(base, name=f"probe-{size}-{'offload' if offload else 'gpu'}", size=size,
                               steps=args.probe_steps, warmup=1, micro_batch=args.probe_micro_batch, accum=1,
                               activation_checkpointing=True, cpu_offload=offload)
                    record = launch(job, 1, folder, left())
                    record.pop("loss_curve", None)
                    probe.append(record)
                    if not record.get("ok"):
                        break
    fits = [record for record in probe if record.get("ok")]

    def largest(offload: bool) -> str | None:
        return max((r["size"] for r in fits if r["cpu_offload"] == offload), key=list(SHAPES).index, default=None)

    output = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if args.device == "cuda" else 0,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "settings": dict(base, nproc_max=args.nproc_max, global_batch_tokens=args.micro_batch * args.accum * args.seq,
                         precision="bf16-mixed", teacher_dtype="bfloat16", peak_flops=PEAK_FLOPS),
        "runs": runs, "resume": resume, "probe": probe,
        "largest_pair_one_gpu": {
            "without_offload": largest(False), "with_cpu_offload": largest(True),
        },
        "total_s": time.perf_counter() - started,
    }

    def figure(name: str, key: str):
        return runs.get(name, {}).get(key) if runs.get(name, {}).get("ok") else None

    one_gpu = {key: output[key] for key in ("command", "device", "date", "torch", "settings")}
    one_gpu.update({name: runs[name] for name in ("plain-1", "fsdp-1") if name in runs})
    plain_loss, fsdp_loss = figure("plain-1", "last_loss"), figure("fsdp-1", "last_loss")
    if plain_loss is not None and fsdp_loss is not None:  # the same computation: equal up to reduction order
        one_gpu["last_loss_rel_diff_fsdp_vs_plain"] = abs(fsdp_loss - plain_loss) / abs(plain_loss)
    one_gpu.update(probe=probe, largest_pair_one_gpu=output["largest_pair_one_gpu"])
    two_gpu = {key: output[key] for key in ("command", "device", "gpus", "date", "torch", "settings")}
    two_gpu.update(distill_tokens_per_s={"1": figure("fsdp-1", "tokens_per_s"), "2": figure("fsdp-2", "tokens_per_s")},
                   mfu={"1": figure("fsdp-1", "mfu"), "2": figure("fsdp-2", "mfu")},
                   final_loss={"1": figure("fsdp-1", "last_loss"), "2": figure("fsdp-2", "last_loss")},
                   resumed_ok=resume.get("resumed_ok"), resume=resume)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2))
    (out.parent / "fsdp-h200.json").write_text(json.dumps(one_gpu, indent=2))
    (out.parent / "multi-gpu-h200x2.json").write_text(json.dumps(two_gpu, indent=2))
    print(json.dumps({"distill_tokens_per_s": two_gpu["distill_tokens_per_s"], "final_loss": two_gpu["final_loss"],
                      "resumed_ok": two_gpu["resumed_ok"], "largest_pair_one_gpu": output["largest_pair_one_gpu"],
                      "total_s": output["total_s"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("worker", help="one run (internal: the driver launches it)")
    run.add_argument("job")
    every = sub.add_parser("all", help="the driver: plain, fsdp, resume, probe")
    every.add_argument("--out", required=True)
    every.add_argument("--runs", default="plain,fsdp,resume,probe", help="which parts, comma-separated")
    every.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    every.add_argument("--size", default="1b", choices=list(SHAPES))
    every.add_argument("--nproc-max", type=int, default=None, help="default: the GPUs visible (1 on CPU: 2)")
    every.add_argument("--seq", type=int, default=4096)
    every.add_argument("--micro-batch", type=int, default=4)
    every.add_argument("--accum", type=int, default=2, help="micro-batches a step (a multiple of the processes)")
    every.add_argument("--steps", type=int, default=12)
    every.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    every.add_argument("--lr", type=float, default=3e-4)
    every.add_argument("--compile", action="store_true", help="compile_blocks=True (default eager)")
    every.add_argument("--activation-checkpointing", action="store_true", help="in the throughput runs too")
    every.add_argument("--resume-at", type=int, default=6)
    every.add_argument("--resume-rtol", type=float, default=0.02,
                       help="resumed_ok: |last loss - uninterrupted 2-GPU last loss| <= this x it")
    every.add_argument("--probe-sizes", default="3b,7b,8b", help="without CPU offload, ascending")
    every.add_argument("--probe-offload-sizes", default="8b,13b,15b", help="with cpu_offload, ascending")
    every.add_argument("--probe-steps", type=int, default=3)
    every.add_argument("--probe-micro-batch", type=int, default=1, help="sequences of --seq tokens a probe step")
    every.add_argument("--probe-min-s", type=float, default=60, help="start no probe with less time left")
    every.add_argument("--budget-s", type=float, default=480, help="the whole driver's time (runs are cut at it)")
    every.add_argument("--work-dir", default=None, help="scratch (DCP state of the resume check); default /tmp")
    args = parser.parse_args()
    if args.command == "worker":
        worker(json.loads(Path(args.job).read_text()))
        return
    if args.nproc_max is None:
        import torch

        args.nproc_max = torch.cuda.device_count() if args.device == "cuda" else 2
    drive(args)


if __name__ == "__main__":
    main()
