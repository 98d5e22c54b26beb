"""The reference kernels against the definition, and (on CUDA) the fast kernels against the reference."""

import logging

import pytest
import torch

from pipeline.model import kernels
from pipeline.model.kernels import (
    causal_conv,
    causal_conv_step,
    selective_scan,
    selective_scan_reference,
    selective_state_step,
    use_kernels,
)

from tests.model.oracles import selective_scan_naive


def scan_inputs(batch=2, channels=32, state=16, length=37, groups=2, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(
        u=rand(batch, channels, length),
        delta=rand(batch, channels, length, scale=0.5),
        A=(-torch.exp(torch.randn(channels, state, generator=g))).to(device),  # fp32, as in the model
        B=rand(batch, groups, state, length),
        C=rand(batch, groups, state, length),
        D=torch.randn(channels, generator=g).to(device),
        z=rand(batch, channels, length),
        delta_bias=torch.randn(channels, generator=g).to(device) * 0.5,
    )


@pytest.mark.parametrize("length", [1, 3, 4, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_scan_matches_per_token_recurrence(length, with_state):
    x = scan_inputs(length=length)
    initial = torch.randn(2, 32, 16) if with_state else None
    y, last = selective_scan_reference(**x, initial_state=initial)
    y_ref, last_ref = selective_scan_naive(**x, initial_state=initial)
    assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(last, last_ref, atol=1e-4, rtol=1e-4)


def test_reference_scan_gradients_match_per_token_recurrence():
    leaves = {k: v.clone().requires_grad_(True) for k, v in scan_inputs(length=21).items()}
    y, last = selective_scan_reference(**leaves)
    (y.square().sum() + last.sum()).backward()
    grads = {k: v.grad.clone() for k, v in leaves.items()}
    leaves_ref = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    y_ref, last_ref = selective_scan_naive(**leaves_ref)
    (y_ref.square().sum() + last_ref.sum()).backward()
    for name, grad in grads.items():
        assert torch.allclose(grad, leaves_ref[name].grad, atol=1e-3, rtol=1e-3), name


def test_reference_scan_is_stable_with_strong_decay():
    """Log-decays of hundreds per token would overflow exp(-S) unfloored; the result stays finite and right."""
    x = scan_inputs(length=64)
    x["delta"] = x["delta"] + 6.0  # dt ~ 6, A down to -e^3: log-decay of hundreds per token
    y, last = selective_scan_reference(**x)
    y_ref, _ = selective_scan_naive(**x)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)


def test_split_scan_equals_whole_scan():
    x = scan_inputs(length=40)
    whole, last = selective_scan_reference(**x)
    first = {k: (v[..., :15] if v.dim() >= 3 and v.shape[-1] == 40 else v) for k, v in x.items()}
    second = {k: (v[..., 15:] if v.dim() >= 3 and v.shape[-1] == 40 else v) for k, v in x.items()}
    y1, state = selective_scan_reference(**first)
    y2, last2 = selective_scan_reference(**second, initial_state=state)
    assert torch.allclose(torch.cat([y1, y2], -1), whole, atol=1e-5)
    assert torch.allclose(last2, last, atol=1e-5)


def test_state_step_matches_scan():
    x = scan_inputs(length=6)
    y_scan, _ = selective_scan_reference(**x)
    state = torch.zeros(2, 32, 16)
    steps = []
    for t in range(6):
        steps.append(selective_state_step(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                          x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"]))
    assert torch.allclose(torch.stack(steps, -1), y_scan, atol=1e-5)


def test_conv_step_matches_conv():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 8, 10, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    full = causal_conv(x, weight, bias)
    state = torch.zeros(2, 8, 4)
    steps = [causal_conv_step(x[..., t], state, weight, bias) for t in range(10)]
    assert torch.allclose(torch.stack(steps, -1), full, atol=1e-6)
    # continuing from a cached window equals the conv over the whole sequence
    window = x[..., 2:6]  # the last d_conv inputs before position 6
    assert torch.allclose(causal_conv(x[..., 6:], weight, bias, context=window), full[..., 6:], atol=1e-6)


def test_reference_path_is_logged_once(caplog):
    kernels._announced.clear()
    x = scan_inputs(length=5)
    with caplog.at_level(logging.INFO, logger="pipeline.model.kernels"):
        selective_scan(**x)
        assert selective_scan(**x)[1] is None  # no last state unless asked
    messages = [r.getMessage() for r in caplog.records if "selective_scan" in r.getMessage()]
    assert messages == ["kernel selective_scan: PyTorch chunked reference"]
    assert kernels.paths_used()["selective_scan"] == ["PyTorch chunked reference"]


def test_cuda_mode_without_cuda_is_an_actionable_error():
    x = scan_inputs(length=4)
    with use_kernels("cuda"), pytest.raises(kernels.KernelUnavailableError, match="HYBRID_KERNELS=cuda"):
        selective_scan(**x)


def test_unknown_kernel_mode_is_rejected():
    with pytest.raises(ValueError, match="kernel mode"):
        kernels.set_kernel_mode("fast")


# --- CUDA path against the reference (run on the GPU machine; skipped elsewhere) -----------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOLERANCE = {torch.float32: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_scan_matches_reference_forward_and_backward(dtype):
    pytest.importorskip("mamba_ssm")
    x = scan_inputs(batch=2, channels=256, state=16, length=300, groups=16, device="cuda", dtype=dtype)
    results = {}
    for mode in ("cuda", "reference"):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
        with use_kernels(mode):
            y, last = selective_scan(**leaves, return_last_state=True)
        y.float().square().mean().backward()  # the last state only feeds caches: no gradient through it
        results[mode] = (y.float(), last.float(), {k: v.grad.float() for k, v in leaves.items()})
    (y_c, last_c, g_c), (y_r, last_r, g_r) = results["cuda"], results["reference"]
    tol = TOLERANCE[dtype]
    assert torch.allclose(y_c, y_r, **tol), (y_c - y_r).abs().max()
    assert torch.allclose(last_c, last_r, **tol), (last_c - last_r).abs().max()
    for name in g_c:
        scale = g_r[name].abs().max().clamp(min=1e-6)
        assert ((g_c[name] - g_r[name]).abs().max() / scale) < tol["rtol"] * 4, name


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_kernels_match_reference(dtype):
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    x = scan_inputs(batch=3, channels=256, state=16, length=1, groups=16, device="cuda", dtype=dtype)
    args = [x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"], x["z"][..., 0],
            x["delta_bias"]]
    states = {m: torch.randn(3, 256, 16, device="cuda", generator=None) for m in ("cuda",)}
    states["reference"] = states["cuda"].clone()
    outs = {}
    for mode in ("cuda", "reference"):
        with use_kernels(mode):
            outs[mode] = selective_state_step(states[mode], *args).float()
    tol = TOLERANCE[dtype]
    assert torch.allclose(outs["cuda"], outs["reference"], **tol)
    assert torch.allclose(states["cuda"], states["reference"], **tol)
    weight = torch.randn(256, 4, device="cuda", dtype=dtype)
    bias = torch.randn(256, device="cuda", dtype=dtype)
    seq = torch.randn(3, 256, 20, device="cuda", dtype=dtype)
    conv = {}
    for mode in ("cuda", "reference"):
        with use_kernels(mode):
            conv[mode] = causal_conv(seq, weight, bias).float()
    assert torch.allclose(conv["cuda"], conv["reference"], **tol)
    conv_state = {m: torch.randn(3, 256, 4, device="cuda", dtype=dtype) for m in ("cuda",)}
    conv_state["reference"] = conv_state["cuda"].clone()
    step = {}
    for mode in ("cuda", "reference"):
        with use_kernels(mode):
            step[mode] = causal_conv_step(seq[..., 0], conv_state[mode], weight, bias).float()
    assert torch.allclose(step["cuda"], step["reference"], **tol)
    assert torch.allclose(conv_state["cuda"].float(), conv_state["reference"].float(), **tol)


@pytest.mark.gpu
@cuda
def test_cuda_hybrid_generation_matches_reference_path():
    """End to end on the GPU: a hybrid's prefill + decode logits with the fast kernels vs the reference."""
    pytest.importorskip("mamba_ssm")
    from pipeline.convert import hybridize
    from pipeline.model import cache_of
    from tests.model.helpers import make_teacher, randomise

    hybrid = hybridize(make_teacher("llama", num_hidden_layers=4), [0, 2], identity_layers=[3]).cuda().eval()
    randomise(hybrid)
    ids = torch.randint(3, 97, (2, 40), device="cuda")
    logits = {}
    for mode in ("cuda", "reference"):
        with use_kernels(mode), torch.no_grad():
            out = hybrid(ids[:, :30], use_cache=True)
            cache, pieces = cache_of(out), [out.logits]
            for t in range(30, 40):
                out = hybrid(ids[:, t: t + 1], cache=cache, attention_mask=torch.ones(2, t + 1, device="cuda"))
                pieces.append(out.logits)
            logits[mode] = torch.cat(pieces, 1)
    assert torch.allclose(logits["cuda"], logits["reference"], atol=2e-3, rtol=2e-3)
