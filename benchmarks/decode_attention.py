"""Decode attention alone: the split-K Triton kernel against the plain-PyTorch path, achieved bandwidth.

Bytes = the K and V columns filled so far, read once (the least any kernel must move). Sweeps the Triton
kernel's block size, warps and pipeline stages; prints one line per configuration and the best.

Usage: python benchmarks/decode_attention.py [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from pipeline.evaluate.decode_kernels import DecodeAttention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # the Apriel-15B attention shape
CASES = [(1, 4096, 3840), (50, 4096, 3840), (237, 4096, 3840), (12, 16384, 16128), (62, 16384, 16128)]


def time_ms(function, repeats: int = 20) -> float:
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def plain(q, keys, values, valid, scale):
    """The engine's PyTorch path: two batched GEMMs over the whole buffer under a mask."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = HEADS // KV_HEADS
    records = []
    for batch, length, filled in CASES:
        q = torch.randn(batch, KV_HEADS, rows, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        keys = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        valid = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
        valid[:, :filled] = True
        slot = torch.tensor([filled - 1], device="cuda")
        moved = 2 * batch * KV_HEADS * filled * HEAD_DIM * 2
        scale = HEAD_DIM**-0.5
        base_ms = time_ms(lambda: plain(q, keys, values, valid, scale))
        reference = plain(q, keys, values, valid, scale).float()
        best = None
        for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
            try:
                kernel = DecodeAttention(batch, KV_HEADS, rows, HEAD_DIM, length, torch.device("cuda"), torch.bfloat16,
                                         block_n=block_n, num_warps=warps, num_stages=stages)
                error = (kernel(q, keys, values, valid, slot, scale).float() - reference).abs().max().item()
                ms = time_ms(lambda: kernel(q, keys, values, valid, slot, scale))
            except Exception as failure:  # a configuration that does not compile (shared memory)
                print(f"  b{batch} L{length} block {block_n} warps {warps} stages {stages}: {type(failure).__name__}")
                continue
            record = {"batch": batch, "length": length, "filled": filled, "block_n": block_n, "num_warps": warps,
                      "num_stages": stages, "splits": kernel.n_splits, "ms": ms, "tb_per_s": moved / ms / 1e9,
                      "plain_ms": base_ms, "plain_tb_per_s": moved / base_ms / 1e9, "max_abs_error": error}
            print(json.dumps(record), flush=True)
            if best is None or ms < best["ms"]:
                best = record
        print(f"BEST b{batch} L{length}: {best['tb_per_s']:.2f} TB/s (block {best['block_n']}, warps "
              f"{best['num_warps']}, stages {best['num_stages']}, {best['splits']} splits) vs plain "
              f"{best['plain_tb_per_s']:.2f} TB/s", flush=True)
        records.append(best)
        del q, keys, values
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "records": records}, handle, indent=2)


if __name__ == "__main__":
    main()
