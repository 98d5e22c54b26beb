"""Cost of the pure-PyTorch reference scan against sequence length (prints a table; CPU or CUDA).

The scan loops over chunks, never over tokens, and each chunk costs the same, so time per token should
stay flat as the length grows. Usage: python benchmarks/scan_scaling.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.model.kernels import selective_scan_reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'length':>8} {'ms':>10} {'us/token':>10}")
    for length in (int(v) for v in args.lengths.split(",")):
        b, d, n, g = 1, args.channels, 16, args.channels // 16
        x = dict(
            u=torch.randn(b, d, length), delta=torch.randn(b, d, length), A=-torch.rand(d, n) - 0.1,
            B=torch.randn(b, g, n, length), C=torch.randn(b, g, n, length), D=torch.randn(d),
            z=torch.randn(b, d, length), delta_bias=torch.zeros(d),
        )
        x = {k: v.to(args.device) for k, v in x.items()}
        selective_scan_reference(**x)  # warm-up
        times = []
        for _ in range(3):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            selective_scan_reference(**x)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"{length:>8} {best * 1e3:>10.1f} {best * 1e6 / length:>10.2f}")


if __name__ == "__main__":
    main()
