"""Which decoding path changes a checkpoint's greedy answers? Accuracy of one checkpoint through every path.

For each checkpoint folder, the demo's held-out problems are answered greedily through:
  ref-generate     fp32, PyTorch reference kernels, `model.generate()` (what the CPU runs)
  ref-engine       fp32, reference kernels, the GenerationEngine (unfused step)
  cuda-engine      fp32, CUDA kernels (mamba_ssm / causal_conv1d), engine, unfused step
  cuda-generate    fp32, CUDA kernels, generate()
  bf16-fused       bf16, CUDA kernels, engine with the fused Triton decode step
  bf16-engine      bf16, CUDA kernels, engine, unfused step (MambaMixer.step)
  bf16-generate    bf16, CUDA kernels, generate()
and, per path, the share of answers whose text equals ref-generate's, and the teacher-forced agreement:
the share of generated tokens that equal the argmax of one fp32 reference forward over prompt + generated.

Usage: PYTHONPATH=. python benchmarks/decode_check.py CHECKPOINT... [--examples 200] [--experiment gpu_demo]
       [--out x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline.config import DataConfig, HardwareConfig  # noqa: E402
from pipeline.data import is_correct, prompt_batch  # noqa: E402
from pipeline.evaluate.engine import GenerationEngine  # noqa: E402
from pipeline.model import kernels  # noqa: E402
from pipeline.stages.common import StageData, load_model, load_tokenizer  # noqa: E402

PATHS = {  # name: (dtype, kernel mode, runner, fused)
    "ref-generate": (torch.float32, "reference", "generate", None),
    "ref-engine": (torch.float32, "reference", "engine", False),
    "cuda-engine": (torch.float32, "auto", "engine", False),
    "cuda-generate": (torch.float32, "auto", "generate", None),
    "bf16-fused": (torch.bfloat16, "auto", "engine", True),
    "bf16-engine": (torch.bfloat16, "auto", "engine", False),
    "bf16-generate": (torch.bfloat16, "auto", "generate", None),
}


@torch.no_grad()
def answers(model, tokenizer, rows, runner: str, fused, batch_size: int, max_new: int):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    device = next(model.parameters()).device
    engine = None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = prompt_batch(chunk, tokenizer)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if runner == "engine":
            if engine is None or engine.batch_size != ids.shape[0] or engine.max_length < ids.shape[1] + max_new:
                engine = GenerationEngine(model, ids.shape[0], ids.shape[1] + max_new + 16, prefill_batch=ids.shape[0],
                                          fused=fused)
            new = engine.generate(ids, mask, max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id).tokens
        else:
            full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                  pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            new = full[:, ids.shape[1]:]
        for i in range(len(chunk)):
            out.append((ids[i].cpu(), mask[i].cpu(), new[i].cpu()))
    return out


@torch.no_grad()
def forced_agreement(reference_model, generated, eos: int) -> float:
    """Share of generated tokens (up to and including EOS) equal to the fp32 reference's argmax given the
    same prefix: 1.0 means the path decoded exactly what a full forward predicts."""
    device = next(reference_model.parameters()).device
    same = total = 0
    with kernels.use_kernels("reference"):
        for ids, mask, new in generated:
            new = new.tolist()
            if eos in new:
                new = new[: new.index(eos) + 1]
            if not new:
                continue
            prompt = ids[mask.bool()]
            sequence = torch.cat([prompt, torch.tensor(new)])[None].to(device)
            logits = reference_model(sequence).logits[0, prompt.numel() - 1: -1]
            predicted = logits.argmax(-1).cpu().tolist()
            same += sum(int(a == b) for a, b in zip(predicted, new))
            total += len(new)
    return same / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--paths", nargs="*", default=list(PATHS))
    parser.add_argument("--experiment", default=None, help="conf/experiment preset whose data the checkpoints "
                        "were made for (default: the CPU demo's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = [p for p in args.paths if device == "cuda" or PATHS[p][1] == "reference"]
    data = DataConfig()
    if args.experiment:
        from gpu_pipeline import preset_config

        data = preset_config(args.experiment).data
    records = []
    for folder in args.checkpoints:
        tokenizer = load_tokenizer(folder)
        rows = StageData(data, tokenizer).eval_problems(args.examples)
        reference = load_model(folder, HardwareConfig(device=device, precision="fp32"), fp32=True)
        baseline = None
        for name in paths:
            dtype, mode, runner, fused = PATHS[name]
            model = reference if dtype == torch.float32 else load_model(
                folder, HardwareConfig(device=device, precision="bf16-mixed"))
            start = time.perf_counter()
            with kernels.use_kernels(mode):
                generated = answers(model, tokenizer, rows, runner, fused, args.batch, args.max_new_tokens)
            seconds = time.perf_counter() - start
            texts = tokenizer.batch_decode([g[2] for g in generated], skip_special_tokens=True)
            correct = [is_correct(t, r["answer"]) for t, r in zip(texts, rows)]
            baseline = baseline or texts
            record = {
                "checkpoint": Path(folder).name, "path": name, "dtype": str(dtype).removeprefix("torch."),
                "accuracy": sum(correct) / len(rows),
                "same_text_as_ref_generate": sum(a == b for a, b in zip(texts, baseline)) / len(rows),
                "forced_agreement": forced_agreement(reference, generated, tokenizer.eos_token_id),
                "seconds": round(seconds, 2), "sample": texts[0],
            }
            records.append(record)
            print(json.dumps(record), flush=True)
    print("kernels used:", json.dumps(kernels.paths_used()))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                              "torch": torch.__version__, "records": records}, indent=2))


if __name__ == "__main__":
    main()
