"""Each rank's host memory while building a sharded teacher + student pair, and what it says for real pairs.

Measured (CPU, gloo, the stage's real launcher `train_sharded_under_torchrun` with no training step): a
random Llama teacher (--hidden, --layers; fp32) and its conversion (--convert layers MIL-initialised) are
built sharded on N ranks; every rank records its peak resident memory over the building (Linux's
high-water mark, reset just before: `pipeline.train.distributed.HostMemory`) against the pair's whole size,
and the checkpoint the ranks write back is compared byte for byte with the unsharded path's
(`hybridize` + `save_checkpoint`).

Then arithmetic, not a GPU measurement: per-rank GPU memory of training real pairs under FSDP2 on W GPUs
(trainable=all, bf16-mixed), from the measured rule (a rank holds 1/W of the pair plus one layer's new
mixer and attention) and byte counts: fp32 master weights, fp32 gradients and AdamW's two fp32 moments
(16 bytes a student parameter) and the bf16 teacher (2 bytes a parameter), all sharded; at the optimiser
step AdamW's foreach path holds one more fp32 copy of the rank's moments (4 bytes); in the forward and
backward the bf16 autocast copies of the student's weights (up to 2 bytes a student parameter a rank,
if autocast keeps every gathered block's copy for the whole forward) and the activations of one
--seq-token sequence with activation checkpointing (each block's fp32 input, one block recomputed, the
loss's logit chunks). The largest of those two moments must fit the card's usable memory.

    python benchmarks/sharded_build.py --out benchmarks/results/sharded-build-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Real pairs: (name, student ~ teacher shape) by the numbers that size them.
SHAPES = {
    "TinyLlama-1.1B": dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000, tied=False),
    "Llama-3.2-3B": dict(hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8, vocab=128256, tied=False),
    "Llama-2-7B": dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000, tied=False),
    "Apriel-15B": dict(hidden=5120, layers=50, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=131072,
                       tied=False),
}
CARDS_GIB = {"80 GB (H100/A100)": 79.2, "H200": 139.8}  # usable memory torch reports


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--nprocs", default="2", help="rank counts to measure, comma-separated")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--convert", default="2,5", help="layers the student converts")
    parser.add_argument("--seq", type=int, default=8192, help="tokens a sequence, for the activation arithmetic")
    args = parser.parse_args(argv)
    args.nprocs = [int(n) for n in args.nprocs.split(",")]
    args.convert = tuple(int(n) for n in args.convert.split(","))
    return args


def measure(args, root: Path) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import DataConfig, HardwareConfig
    from pipeline.convert import hybridize
    from pipeline.convert.sharded import ModelSource
    from pipeline.data import build_char_tokenizer
    from pipeline.data.demo import DemoDataConfig
    from pipeline.stages.common import ConsoleReporter, load_model, load_tokenizer, save_checkpoint
    from pipeline.stages.launch import MEMORY_FILE, RESULT_DIR, TrainingJob, train_sharded_under_torchrun
    from pipeline.train import TrainConfig

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    heads = args.hidden // 64
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    folder = root / "teacher"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del teacher
    cpu = HardwareConfig(device="cpu", precision="fp32")
    save_checkpoint(hybridize(load_model(folder, cpu, "teacher", fp32=True), args.convert, seed=0),
                    load_tokenizer(folder), root / "reference", "float32")
    data = DataConfig(max_length=32, demo=DemoDataConfig(n_train=16, n_validation=4, n_test=4, n_text_train=4,
                                                         n_text_validation=4, n_text_test=4))
    records = []
    for nproc in args.nprocs:
        work, out = root / f"work-{nproc}", root / f"out-{nproc}"
        job = TrainingJob(train=TrainConfig(steps=1, batch_size=2, max_length=32, save_dtype="float32"), data=data,
                          batches="distill", state_dir=str(root / f"state-{nproc}"), precision="fp32", device="cpu",
                          teacher_dir=str(folder), student=ModelSource(str(folder), args.convert, 0),
                          tokenizer_dir=str(folder), max_steps=0)
        started = time.perf_counter()
        train_sharded_under_torchrun(job, hardware=HardwareConfig(device="cpu", nproc=nproc), work_dir=work,
                                     out_dir=out, reporter=ConsoleReporter(f"[{nproc} ranks] "), label="student")
        seconds = time.perf_counter() - started
        ranks = [json.loads((work / "torchrun" / RESULT_DIR / MEMORY_FILE.format(rank=rank)).read_text())
                 for rank in range(nproc)]
        pair = ranks[0]["model_bytes"]
        same = all(filecmp.cmp(root / "reference" / name, out / name, shallow=False)
                   for name in ("config.json", "generation_config.json", "model.safetensors"))
        records.append({"ranks": nproc, "pair_bytes": pair, "peak_bytes": [r["peak_bytes"] for r in ranks],
                        "ratio": [r["peak_bytes"] / pair for r in ranks], "share": 1 / nproc,
                        "overhead_bytes": max(r["peak_bytes"] for r in ranks) - pair / nproc,
                        "checkpoint_identical_to_unsharded": same, "seconds": round(seconds, 1)})
    return records


def _widths(shape: dict) -> tuple[int, int, int]:
    head_dim = shape.get("head_dim") or shape["hidden"] // shape["heads"]
    return shape["hidden"], shape["heads"] * head_dim, shape["kv_heads"] * head_dim  # h, d_inner, d_xb


def mixer_parameters(shape: dict) -> int:
    """A Mamba mixer in the MIL layout (d_state 16, dt_rank 16, d_conv 4)."""
    h, d_inner, d_xb = _widths(shape)
    return (2 * d_inner + 2 * d_xb) * h + 16 * h + 17 * d_inner + 5 * d_inner + 16 * d_inner + d_inner + d_inner * h


def attention_parameters(shape: dict) -> int:
    h, d_inner, d_xb = _widths(shape)
    return 2 * d_inner * h + 2 * d_xb * h


def layer_bytes(shape: dict) -> int:
    """fp32 bytes of one converted layer's transient on the host: its new mixer and its attention, whole."""
    return 4 * (mixer_parameters(shape) + attention_parameters(shape))


def pair_parameters(shape: dict) -> tuple[int, int]:
    """(student, teacher) parameters: the teacher all attention, the student every other layer Mamba."""
    h, layers, inter, vocab = (shape[k] for k in ("hidden", "layers", "intermediate", "vocab"))
    block = attention_parameters(shape) + 3 * h * inter + 2 * h
    teacher = layers * block + vocab * h * (1 if shape["tied"] else 2) + h
    student = teacher + (layers // 2) * (mixer_parameters(shape) - attention_parameters(shape))
    return student, teacher


def activation_bytes(shape: dict, seq: int) -> int:
    """One sequence with activation checkpointing: each block's fp32 input, one block recomputed (its bf16
    intermediates, about 6 of hidden and 3 of the MLP width a token), the loss's logit chunks (2 x 128 MiB
    fp32, student and teacher, and their gradient)."""
    h, layers, inter = shape["hidden"], shape["layers"], shape["intermediate"]
    return layers * seq * h * 4 + seq * (6 * h + 3 * inter) * 2 + 3 * 2**27


# benchmarks/results/fsdp-h200.md: the 3B pair (3.74B student, 3.61B teacher) trained on one H200 with
# activation checkpointing and one 4096-token sequence a step at a peak of 82.1 GiB
MEASURED_3B = dict(student=3.74e9, teacher=3.61e9, seq=4096, peak_gib=82.1)


def peaks(student: float, teacher: float, ranks: int, activations: float, rest: float) -> dict[str, float]:
    """Per-rank bytes at the optimiser step and in the forward/backward (see the module docstring)."""
    sharded = (16 * student + 2 * teacher) / ranks
    return {"sharded": sharded,
            "step": sharded + 4 * student / ranks + rest,  # AdamW's foreach temporary
            "forward": sharded + 2 * student + activations + rest,  # every gathered block's bf16 copy kept
            "lean": sharded + activations + rest}  # the copies freed block by block


def arithmetic(args) -> tuple[list[dict], dict]:
    shape_3b = SHAPES["Llama-3.2-3B"]
    step_3b = peaks(MEASURED_3B["student"], MEASURED_3B["teacher"], 1, 0, 0)["step"]
    rest = MEASURED_3B["peak_gib"] * 2**30 - step_3b  # what the byte counts leave out (allocator, workspace)
    calibration = {**MEASURED_3B, "step_arithmetic_gib": step_3b / 2**30, "rest_gib": rest / 2**30,
                   "note": "the arithmetic's optimiser-step peak for the measured 3B pair, and what it leaves out "
                           "of the measured peak; that rest is added to every rank below",
                   "activations_gib_at_4096": activation_bytes(shape_3b, 4096) / 2**30}
    rows = []
    for name, shape in SHAPES.items():
        student, teacher = pair_parameters(shape)
        for ranks in (1, 2, 4, 8):
            bytes_ = peaks(student, teacher, ranks, activation_bytes(shape, args.seq), rest)
            worst, lean = max(bytes_["step"], bytes_["forward"]), max(bytes_["step"], bytes_["lean"])
            rows.append({"pair": name, "student_parameters": student, "teacher_parameters": teacher, "ranks": ranks,
                         **{f"{key}_gib": value / 2**30 for key, value in bytes_.items()},
                         "host_build_transient_gib": layer_bytes(shape) / 2**30,
                         "fits": {card: worst / 2**30 <= usable for card, usable in CARDS_GIB.items()},
                         "fits_if_copies_freed": {card: lean / 2**30 <= usable for card, usable in CARDS_GIB.items()}})
    return rows, calibration


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sharded-build-") as scratch:
        records = measure(args, Path(scratch))
    table, calibration = arithmetic(args)
    measured_shape = dict(hidden=args.hidden, heads=args.hidden // 64, kv_heads=max(1, args.hidden // 64 // 3))
    for record in records:  # what the rule says the overhead is: one converted layer's transient
        record["expected_overhead_bytes"] = layer_bytes(measured_shape)
    for record in records:
        ratios = ", ".join(f"{ratio:.3f}" for ratio in record["ratio"])
        print(f"{record['ranks']} ranks: peak host memory a rank {ratios} of the {record['pair_bytes'] / 2**20:.0f} MiB "
              f"pair (share {record['share']:.3f} + {record['overhead_bytes'] / 2**20:.1f} MiB; one layer's new mixer "
              f"and attention: {record['expected_overhead_bytes'] / 2**20:.1f} MiB); checkpoint "
              f"{'identical' if record['checkpoint_identical_to_unsharded'] else 'DIFFERENT'} to the unsharded path's")
    print(f"\narithmetic (not a GPU measurement): per-rank GiB, trainable=all, bf16-mixed, {args.seq}-token sequences, "
          f"activation checkpointing; every rank also {calibration['rest_gib']:.1f} GiB the byte counts leave out of "
          f"the measured 3B pair's {calibration['peak_gib']} GiB (their step peak: {calibration['step_arithmetic_gib']:.1f})")
    print(f"{'pair':<16}{'ranks':>6}{'sharded':>9}{'step':>7}{'fwd':>7}{'lean':>7}  fits (autocast copies kept / freed)")
    for row in table:
        fits = "  ".join(f"{card}: {'yes' if row['fits'][card] else 'no'}/"
                         f"{'yes' if row['fits_if_copies_freed'][card] else 'no'}" for card in CARDS_GIB)
        print(f"{row['pair']:<16}{row['ranks']:>6}{row['sharded_gib']:>9.1f}{row['step_gib']:>7.1f}"
              f"{row['forward_gib']:>7.1f}{row['lean_gib']:>7.1f}  {fits}")
    report = {
        "measured": records,
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "converted": list(args.convert), "dtype": "fp32 (student and teacher)"},
        "method": "per-rank peak resident memory over building both models sharded (VmHWM reset before; "
                  "models read with plain reads, no memory map), against the pair's parameter bytes",
        "arithmetic": {"note": "arithmetic from the measured rule and byte counts, not a GPU measurement",
                       "seq": args.seq, "cards_gib": CARDS_GIB, "calibration": calibration, "rows": table},
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": "cpu (gloo)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
