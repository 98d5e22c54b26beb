"""Distillation training throughput and MFU for a ~1B hybrid student at sequence length 4096, and the
peak memory of the chunked KL against an unchunked one at vocabulary 131072.

Student: TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads of 64, 4 KV heads, MLP 5632, vocab
32000) with every other layer Mamba; teacher: the same shape, all attention. One optimiser step =
teacher forward + student forward and backward through `pipeline.train.train` exactly as the pipeline
runs it on a GPU: precision="bf16-mixed" (fp32 master weights and AdamW state, bf16 autocast compute),
the frozen teacher held in bf16 and run inside the step, the losses from fp32 logits.
MFU = model FLOPs / (time x 989e12), the H100 / H200 SXM dense bf16 peak; reported for the whole step
and split into the student's part (forward + backward, 3 passes) and the teacher's (forward, 1 pass),
each over the same step time.

Usage: python benchmarks/train_throughput.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch

from pipeline.model import HybridConfig, HybridForCausalLM
from pipeline.train import TrainConfig, train
from pipeline.train.losses import chunk_rows, chunked_distill_loss, reference_distill_loss

PEAK_FLOPS = 989e12
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=8192)


def model(layer_types):
    with torch.device("cuda"):
        return HybridForCausalLM(HybridConfig(**SHAPE, layer_types=layer_types))


def flops_per_token(m: HybridForCausalLM, seq: int, passes: int) -> float:
    """passes: 1 = forward, 3 = forward + backward. Matmul FLOPs of every weight (2 per MAC) plus
    causal attention scores and values (2 * seq * heads * head_dim per token and layer, forward)."""
    weights = sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
    attention = len(m.config.attention_layers) * 2 * seq * m.config.num_attention_heads * m.config.head_dim
    return passes * (2 * weights + 2 * attention)


def distill_benchmark(seq: int, micro_batch: int, accum: int, steps: int, compile_blocks: bool = True) -> dict:
    torch.manual_seed(0)
    teacher = model(["attention"] * SHAPE["num_hidden_layers"]).to(torch.bfloat16).eval()  # frozen, bf16
    student = model(["mamba" if i % 2 else "attention" for i in range(SHAPE["num_hidden_layers"])])  # fp32 masters
    batches = [{"input_ids": torch.randint(0, SHAPE["vocab_size"], (micro_batch, seq), device="cuda")}
               for _ in range(accum * 2)]
    cfg = TrainConfig(steps=steps + 3, lr=1e-4, warmup_steps=0, batch_size=micro_batch, max_length=seq, grad_accum=accum,
                      trainable="all", loss="reverse_kl", kl_chunk_tokens=4096, log_every=1,
                      compile_blocks=compile_blocks)
    times = []

    def callback(metrics):
        times.append(metrics.step_time_s)

    train(student, batches, cfg, teacher=teacher, callback=callback, precision="bf16-mixed")
    step_s = sorted(times[3:])[len(times[3:]) // 2]  # median after 3 warm-up steps
    tokens = micro_batch * accum * seq
    student_flops = tokens * flops_per_token(student, seq, 3)
    teacher_flops = tokens * flops_per_token(teacher, seq, 1)
    flops = student_flops + teacher_flops
    result = {
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_pattern": student.config.layer_pattern, "seq_len": seq, "micro_batch": micro_batch,
        "grad_accum": accum, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "precision": "bf16-mixed", "student_dtype": str(next(student.parameters()).dtype),
        "teacher_dtype": str(next(teacher.parameters()).dtype),
        "model_tflops_per_step": flops / 1e12, "mfu": flops / step_s / PEAK_FLOPS,
        "student_tflops_per_step": student_flops / 1e12, "student_mfu": student_flops / step_s / PEAK_FLOPS,
        "teacher_tflops_per_step": teacher_flops / 1e12, "teacher_mfu": teacher_flops / step_s / PEAK_FLOPS,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "compile_blocks": compile_blocks,
    }
    del teacher, student, batches
    gc.collect()
    torch.cuda.empty_cache()
    return result


def profile_steps(seq: int, micro_batch: int, compile_blocks: bool) -> None:
    """Top CUDA kernels (by total time) over a few distillation steps, warm-up step included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        distill_benchmark(seq, micro_batch, 1, steps=1, compile_blocks=compile_blocks)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90), flush=True)


def kl_memory(tokens: int, hidden: int, vocab: int, chunked: bool) -> float:
    """Peak memory above the inputs (hidden states, head weights and their gradients), GiB."""
    gc.collect()
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    h_s = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    h_t = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    w_s = (torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_(True)
    w_t = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    mask = torch.ones(tokens, dtype=torch.bool, device="cuda")
    inputs = sum(t.numel() * t.element_size() for t in (h_s, h_t, w_s, w_t)) + (h_s.numel() + w_s.numel()) * 2
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if chunked:
        # the element budget (the default chunk_elements) sets the rows per chunk: 1024 at 32k, 256 at 131k
        loss = chunked_distill_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=tokens)
    else:
        loss = reference_distill_loss(h_s @ w_s.T, h_t @ w_t.T, mask)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (h_s.numel() + w_s.numel()) * 2  # minus the grads
    del h_s, h_t, w_s, w_t, loss
    return extra / 2**30, inputs / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 4 steps and exit")
    parser.add_argument("--eager", action="store_true", help="blocks not compiled (compile_blocks=False)")
    args = parser.parse_args()
    if args.profile:
        profile_steps(args.seq, args.micro_batch, not args.eager)
        return
    record = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__}
    record["distillation"] = distill_benchmark(args.seq, args.micro_batch, args.accum, args.steps, not args.eager)
    print(json.dumps(record["distillation"]), flush=True)
    memory = {}
    for vocab in (32768, 131072):
        chunked, inputs = kl_memory(8192, 2048, vocab, chunked=True)
        memory[f"chunked_vocab_{vocab}_gib"] = chunked
        memory[f"inputs_vocab_{vocab}_gib"] = inputs
        try:
            memory[f"unchunked_vocab_{vocab}_gib"] = kl_memory(8192, 2048, vocab, chunked=False)[0]
        except torch.OutOfMemoryError:
            memory[f"unchunked_vocab_{vocab}_gib"] = "out of memory"
    memory["tokens"], memory["hidden"] = 8192, 2048
    memory["rows_per_chunk"] = {str(v): chunk_rows(v, chunk_tokens=8192) for v in (32768, 131072)}
    memory["chunked_growth_32k_to_131k"] = memory["chunked_vocab_131072_gib"] / memory["chunked_vocab_32768_gib"] - 1
    record["kl_memory"] = memory
    print(json.dumps(memory), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
