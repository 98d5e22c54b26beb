"""The one Mamba decode step (`MambaMixer.step` -> `kernels.mamba_decode_step`): its inputs as every caller
passes them, and the Triton kernel against the composed path.

The engine hands the step projections from one GEMM of in_proj and dt_in_proj, so `proj` carries dt_rank
extra columns after z | x | B | C. A step that inferred d_xb from that width read B and C from the wrong
columns on the GPU (2026-11-29: a bf16 H-6 demo hybrid answered 0.055 instead of 0.94).
"""

import os

import pytest
import torch

from pipeline.model import HybridConfig, HybridForCausalLM, kernels, triton_step


def mixer_of(expansion="chunk", conv_bias=True, d_xb=32, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    config = HybridConfig(
        vocab_size=64, hidden_size=96, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, layer_types=["mamba"], mamba_d_inner=128, mamba_d_xb=d_xb,
        mamba_d_state=8, mamba_dt_rank=6, mamba_gqa_expansion=expansion, mamba_conv_bias=conv_bias,
    )
    mixer = HybridForCausalLM(config).model.layers[0].mixer
    with torch.no_grad():  # weights large enough that every input of the step moves the output
        for parameter in mixer.parameters():
            parameter.normal_(0.0, 0.3)
    return mixer.to(device, dtype)


def states(mixer, batch, dtype, device, seed=1):
    generator = torch.Generator().manual_seed(seed)
    conv = torch.randn(batch, mixer.d_inner, mixer.d_conv, generator=generator).to(device, dtype)
    ssm = torch.randn(batch, mixer.d_inner, mixer.d_state, generator=generator).to(device)
    return conv, ssm


@pytest.mark.parametrize("expansion, d_xb", [("chunk", 32), ("chunk", 64), ("head_aligned", 32)])
def test_step_on_fused_projections_equals_step_on_hidden(expansion, d_xb):
    """CPU: the engine's input form (one GEMM, dt columns after in_proj's) gives the mixer's own step."""
    mixer = mixer_of(expansion, d_xb=d_xb)
    hidden = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    conv_a, ssm_a = states(mixer, 3, torch.float32, "cpu")
    conv_b, ssm_b = conv_a.clone(), ssm_a.clone()
    fused_weight = torch.cat([mixer.in_proj.weight, mixer.dt_in_proj.weight])
    with torch.no_grad(), kernels.use_kernels("reference"):
        expected = mixer.step(hidden, conv_a, ssm_a)
        proj = hidden @ fused_weight.T
        out = mixer.step(hidden, conv_b, ssm_b, projected=(proj, proj[:, 2 * 128 + 2 * d_xb:]))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(conv_b, conv_a)
    torch.testing.assert_close(ssm_b, ssm_a, rtol=1e-6, atol=1e-6)


def test_step_refuses_projections_narrower_than_its_layout():
    mixer = mixer_of()
    conv, ssm = states(mixer, 2, torch.float32, "cpu")
    hidden = torch.randn(2, 96)
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError)):
        mixer.step(hidden, conv, ssm, projected=(mixer.in_proj(hidden)[:, :-8], mixer.dt_in_proj(hidden)))


if torch.cuda.is_available():
    DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
else:  # the Triton interpreter has no bfloat16 arithmetic
    DEVICE, DTYPE = torch.device("cpu"), torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not triton_step.available(DEVICE) or (DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                    reason="needs CUDA and triton (or TRITON_INTERPRET=1 with triton on CPU)")
@pytest.mark.parametrize("expansion, conv_bias, d_xb", [("chunk", True, 32), ("chunk", True, 64),
                                                         ("head_aligned", False, 32)])
@pytest.mark.parametrize("wide", [False, True])  # proj as in_proj gives it, or with the dt columns after it
def test_triton_step_matches_the_composed_step(expansion, conv_bias, d_xb, wide):
    mixer = mixer_of(expansion, conv_bias, d_xb, DTYPE, DEVICE)
    hidden = torch.randn(5, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)
    conv_a, ssm_a = states(mixer, 5, DTYPE, DEVICE)
    conv_b, ssm_b = conv_a.clone(), ssm_a.clone()
    with torch.no_grad():
        proj = torch.nn.functional.linear(hidden, torch.cat([mixer.in_proj.weight, mixer.dt_in_proj.weight])) \
            if wide else mixer.in_proj(hidden)
        dt_low = proj[:, 2 * 128 + 2 * d_xb:] if wide else mixer.dt_in_proj(hidden)
        with kernels.use_kernels("reference"):
            expected = mixer.step(hidden, conv_a, ssm_a, projected=(proj, dt_low))
        out = mixer.step(hidden, conv_b, ssm_b, projected=(proj, dt_low))
    assert "fused Triton kernel" in kernels.paths_used()["mamba_decode_step"]
    assert torch.equal(conv_b, conv_a)
    # Both compute in fp32 from the same 16-bit inputs; they round u (the conv output) each once, so a
    # value on a rounding boundary may differ by one ulp. Reading B or C from wrong columns is O(1).
    scale = ssm_a.abs().max()
    assert (ssm_b - ssm_a).abs().max() / scale < 1e-2
    assert (out.float() - expected.float()).abs().max() / expected.float().abs().max() < 3e-2
