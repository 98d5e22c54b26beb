"""Kernel parity on CUDA: the fast path (mamba_ssm, causal_conv1d) against the PyTorch reference.

Prints and writes (JSON) the relative errors ||fast - ref|| / ||ref|| of the selective scan's output,
last state and every input gradient, of the decode-step kernels, and of a hybrid's prefill + decode
logits, in fp32 and bf16. Usage: python benchmarks/kernel_parity.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from pipeline.model import kernels
from pipeline.model.kernels import causal_conv, causal_conv_step, selective_scan, selective_state_step, use_kernels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def inputs(batch, channels, state, length, groups, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    return dict(
        u=rand(batch, channels, length), delta=rand(batch, channels, length, scale=0.5),
        A=-torch.exp(torch.randn(channels, state, generator=g, device="cuda")),
        B=rand(batch, groups, state, length), C=rand(batch, groups, state, length),
        D=torch.randn(channels, generator=g, device="cuda"), z=rand(batch, channels, length),
        delta_bias=torch.randn(channels, generator=g, device="cuda") * 0.5,
    )


def scan_parity(dtype, seed):
    x = inputs(2, 1024, 16, 2048, 64, dtype, seed)  # Apriel-like grouping: d_inner/d_state groups
    out = {}
    for mode in ("cuda", "reference"):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
        with use_kernels(mode):
            y, last = selective_scan(**leaves, return_last_state=True)
        y.float().square().mean().backward()  # the CUDA backward takes no gradient of the last state
        out[mode] = (y.float(), last, {k: v.grad.float() for k, v in leaves.items()})
    (y_c, s_c, g_c), (y_r, s_r, g_r) = out["cuda"], out["reference"]
    return {"y": rel(y_c, y_r), "last_state": rel(s_c, s_r), **{f"grad_{k}": rel(g_c[k], g_r[k]) for k in g_c}}


def decode_parity(dtype, seed):
    x = inputs(8, 1024, 16, 1, 64, dtype, seed)
    args = [x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"], x["z"][..., 0],
            x["delta_bias"]]
    base = torch.randn(8, 1024, 16, device="cuda")
    res = {}
    for mode in ("cuda", "reference"):
        state = base.clone()
        with use_kernels(mode):
            res[mode] = (selective_state_step(state, *args).float(), state)
    weight = torch.randn(1024, 4, device="cuda", dtype=dtype)
    bias = torch.randn(1024, device="cuda", dtype=dtype)
    seq = torch.randn(8, 1024, 300, device="cuda", dtype=dtype)
    conv_state0 = torch.randn(8, 1024, 4, device="cuda", dtype=dtype)
    conv = {}
    for mode in ("cuda", "reference"):
        cs = conv_state0.clone()
        with use_kernels(mode):
            conv[mode] = (causal_conv(seq, weight, bias).float(), causal_conv_step(seq[..., 0], cs, weight, bias).float(), cs)
    return {
        "state_update_y": rel(res["cuda"][0], res["reference"][0]),
        "state_update_state": rel(res["cuda"][1], res["reference"][1]),
        "causal_conv": rel(conv["cuda"][0], conv["reference"][0]),
        "causal_conv_step": rel(conv["cuda"][1], conv["reference"][1]),
        "causal_conv_step_state": rel(conv["cuda"][2].float(), conv["reference"][2].float()),
    }


def small_hybrid(dtype):
    """A 6-layer Mistral-shaped hybrid (hidden 512, layers 0, 2, 3, 5 Mamba) on CUDA, seeded."""
    from transformers import MistralConfig, MistralForCausalLM

    from pipeline.convert import hybridize

    torch.manual_seed(0)
    teacher = MistralForCausalLM(MistralConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, sliding_window=None, max_position_embeddings=4096))
    return hybridize(teacher, [0, 2, 3, 5]).to(device="cuda", dtype=dtype).eval()


def model_parity(dtype):
    from pipeline.model import cache_of

    hybrid = small_hybrid(dtype)
    ids = torch.randint(0, 1000, (4, 300), device="cuda")
    logits = {}
    for mode in ("cuda", "reference"):
        with use_kernels(mode), torch.no_grad():
            out = hybrid(ids[:, :256], use_cache=True)
            cache, pieces = cache_of(out), [out.logits]
            for t in range(256, 300):
                out = hybrid(ids[:, t: t + 1], cache=cache, attention_mask=torch.ones(4, t + 1, device="cuda"))
                pieces.append(out.logits)
            logits[mode] = torch.cat(pieces, 1).float()
    return {"hybrid_prefill_decode_logits": rel(logits["cuda"], logits["reference"])}


def triton_decode_parity(dtype):
    """The engine's Triton decode kernels (pipeline/evaluate/decode_kernels.py, and the Mamba step's
    pipeline/model/triton_step.py) against PyTorch."""
    from pipeline.evaluate import decode_kernels
    from pipeline.evaluate.engine import GenerationEngine

    g = torch.Generator(device="cuda").manual_seed(3)
    b, heads, kv, e, L = 8, 8, 2, 64, 1024
    q = torch.randn(b, kv, heads // kv, e, generator=g, device="cuda").to(dtype)
    keys = torch.randn(b, kv, L, e, generator=g, device="cuda").to(dtype)
    values = torch.randn(b, kv, L, e, generator=g, device="cuda").to(dtype)
    valid = torch.ones(b, L, dtype=torch.bool, device="cuda")
    valid[::2, :100] = False  # left padding on half the rows
    valid[:, 900:] = False
    scores = torch.einsum("bgre,bgle->bgrl", q.float(), keys.float()) * e**-0.5
    expected = torch.einsum("bgrl,bgle->bgre", scores.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1),
                            values.float())
    attention = decode_kernels.DecodeAttention(b, kv, heads // kv, e, L, torch.device("cuda"), dtype)
    out = attention(q, keys, values, valid, torch.tensor([899], device="cuda"), e**-0.5)
    result = {"triton_decode_attention": rel(out.float(), expected)}

    hybrid = small_hybrid(dtype)
    mixer = hybrid.model.layers[0].mixer
    hidden = torch.randn(b, 512, generator=g, device="cuda").to(dtype)
    conv = torch.randn(b, mixer.d_inner, 4, generator=g, device="cuda").to(dtype)
    ssm = torch.randn(b, mixer.d_inner, 16, generator=g, device="cuda")
    conv_t, ssm_t = conv.clone(), ssm.clone()
    with torch.no_grad(), use_kernels("reference"):
        y_ref = mixer.step(hidden, conv, ssm)
    with torch.no_grad():  # the mixer's own step, on the Triton kernel for a 16-bit model on CUDA
        y = mixer.step(hidden, conv_t, ssm_t)
    result["triton_mamba_step_out"] = rel(y.float(), y_ref.float())
    result["triton_mamba_step_state"] = rel(ssm_t, ssm)

    # the whole fused engine step against the plain-PyTorch engine step, teacher-forced for 32 steps
    ids = torch.randint(0, 1000, (4, 256), device="cuda")
    plain = GenerationEngine(hybrid, 4, 300, fused=False, cuda_graph=False)
    fused = GenerationEngine(hybrid, 4, 300, fused=True)
    for engine in (plain, fused):
        engine.generate(ids, max_new_tokens=1)
        engine.tokens.copy_(plain.tokens)
    errors = []
    for _ in range(32):
        plain._run_step()
        fused._run_step()
        errors.append(rel(fused.last_logits.float(), plain.last_logits.float()))
        fused.tokens.copy_(plain.tokens)
    result["triton_engine_step_logits_worst_of_32"] = max(errors)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    record = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "metric": "relative error ||cuda - reference|| / ||reference||",
        "results": {},
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        record["results"][name] = {**scan_parity(dtype, 0), **decode_parity(dtype, 1), **model_parity(dtype)}
    record["results"]["bf16"].update(triton_decode_parity(torch.bfloat16))  # the fused path is for 16-bit models
    record["kernel_paths"] = kernels.paths_used()
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
