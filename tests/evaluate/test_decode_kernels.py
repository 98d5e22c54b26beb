"""The engine's Triton decode kernels against plain PyTorch, and the fused engine against the plain one.

They run on CUDA (marker `gpu`), or on CPU under Triton's interpreter when TRITON_INTERPRET=1 is set and
triton is installed (slow, for development without a GPU); otherwise they skip.
"""

import os

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from pipeline.evaluate import decode_kernels
from pipeline.evaluate.engine import GenerationEngine
from pipeline.model import HybridConfig, HybridForCausalLM
from pipeline.model.config import MAMBA
from pipeline.model.kernels import use_kernels

if torch.cuda.is_available():
    DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
else:  # the interpreter has no bfloat16 arithmetic
    DEVICE, DTYPE = torch.device("cpu"), torch.float16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not decode_kernels.available(DEVICE) or (DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
        reason="needs CUDA and triton (or TRITON_INTERPRET=1 with triton on CPU)",
    ),
]


def reference_attention(q, keys, values, valid, length, scale):
    """q (b, g, r, e), keys / values (b, g, L, e), valid (b, L): softmax over valid columns < length."""
    scores = torch.einsum("bgre,bgle->bgrl", q.float(), keys.float()) * scale
    allowed = valid.clone()
    allowed[:, length:] = False
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.einsum("bgrl,bgle->bgre", scores.softmax(-1), values.float())


@pytest.mark.parametrize("rows", [1, 4, 5])
@pytest.mark.parametrize("n_splits", [1, 3, None])
def test_decode_attention_matches_softmax_attention(rows, n_splits):
    generator = torch.Generator().manual_seed(rows)
    b, g, e, L = 3, 2, 64, 300
    q = torch.randn(b, g, rows, e, generator=generator).to(DEVICE, DTYPE)
    keys = torch.randn(b, g, L, e, generator=generator).to(DEVICE, DTYPE)
    values = torch.randn(b, g, L, e, generator=generator).to(DEVICE, DTYPE)
    valid = torch.ones(b, L, dtype=torch.bool, device=DEVICE)
    valid[1, :37] = False  # a left-padded row
    slot = torch.tensor([200], device=DEVICE)  # columns 0..200 are filled; the rest must be ignored
    keys[:, :, 201:] = float("nan")  # would poison the output if read
    values[:, :, 201:] = float("nan")
    attention = decode_kernels.DecodeAttention(b, g, rows, e, L, DEVICE, DTYPE, n_splits=n_splits)
    out = attention(q, keys, values, valid, slot, e**-0.5)
    keys_read, values_read = keys.nan_to_num(), values.nan_to_num()
    expected = reference_attention(q, keys_read, values_read, valid, 201, e**-0.5)
    assert out.dtype == DTYPE and out.shape == (b, g, rows, e)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    slot.fill_(50)  # the same buffers, a shorter cache: the kernel reads the length from device memory
    out = attention(q, keys, values, valid, slot, e**-0.5)
    torch.testing.assert_close(out.float(), reference_attention(q, keys_read, values_read, valid, 51, e**-0.5),
                               atol=2e-2, rtol=2e-2)


def test_decode_attention_addresses_caches_beyond_2_31_elements():
    """A large batch's cache has more elements than a 32-bit offset reaches (found at batch 600 on an H200)."""
    if DEVICE.type != "cuda" or torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs a CUDA device with 16 GiB free")
    b, g, e, L = 3, 1, 128, 2**23  # sequence 2 starts at element 2^31
    keys = torch.zeros(b, g, L, e, dtype=DTYPE, device=DEVICE)
    values = torch.zeros_like(keys)
    q = torch.randn(b, g, 4, e, device=DEVICE).to(DTYPE)
    values[:, :, :100] = torch.arange(b, device=DEVICE, dtype=DTYPE)[:, None, None, None] + 1  # row i holds i + 1
    valid = torch.zeros(b, L, dtype=torch.bool, device=DEVICE)
    valid[:, :100] = True
    attention = decode_kernels.DecodeAttention(b, g, 4, e, L, DEVICE, DTYPE, n_splits=1)
    out = attention(q, keys, values, valid, torch.tensor([99], device=DEVICE), e**-0.5)
    assert torch.equal(out.float(), (torch.arange(b, device=DEVICE)[:, None, None, None] + 1).float().expand_as(out))


def test_rope_kv_write_matches_transformers():
    generator = torch.Generator().manual_seed(0)
    b, h, g, e, L = 3, 8, 2, 64, 16
    qkv = torch.randn(b, (h + 2 * g) * e, generator=generator).to(DEVICE, DTYPE)
    positions = torch.tensor([3.0, 9.0, 15.0])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, e, 2).float() / e))
    freqs = positions[:, None] * inv_freq[None]
    angles = torch.cat([freqs, freqs], dim=-1)
    cos, sin = angles.cos()[:, None].to(DEVICE, DTYPE), angles.sin()[:, None].to(DEVICE, DTYPE)  # (b, 1, e)
    query = torch.empty(b, h, e, dtype=DTYPE, device=DEVICE)
    keys = torch.zeros(b, g, L, e, dtype=DTYPE, device=DEVICE)
    values = torch.zeros_like(keys)
    slot = torch.tensor([5], device=DEVICE)
    decode_kernels.rope_kv_write(qkv, cos, sin, query, keys, values, slot, h, g)
    q, k, v = qkv.float().split([h * e, g * e, g * e], dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(q.view(b, 1, h, e).transpose(1, 2), k.view(b, 1, g, e).transpose(1, 2),
                                        cos.float(), sin.float())
    torch.testing.assert_close(query.float(), q_ref[:, :, 0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(keys[:, :, 5].float(), k_ref[:, :, 0], atol=2e-2, rtol=1e-2)
    assert torch.equal(values[:, :, 5], v.view(b, g, e).to(DTYPE))
    others = [c for c in range(L) if c != 5]
    assert keys[:, :, others].abs().max() == 0 and values[:, :, others].abs().max() == 0


def test_add_rms_norm_matches_llama_rmsnorm():
    generator = torch.Generator().manual_seed(0)
    width = 5120 + 64  # not a power of two: the tail of the block is masked
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=generator)
    norm = norm.to(DEVICE, DTYPE)
    hidden = torch.randn(4, width, generator=generator).to(DEVICE, DTYPE)
    update = torch.randn(4, width, generator=generator).to(DEVICE, DTYPE)
    expected_hidden = hidden + update
    expected = norm(expected_hidden)
    normed = torch.empty_like(hidden)
    decode_kernels.add_rms_norm(hidden, update, norm.weight, norm.variance_epsilon, normed)
    assert torch.equal(hidden, expected_hidden)  # the residual add rounds as torch's does
    torch.testing.assert_close(normed, expected, atol=0, rtol=1e-2)  # rsqrt may differ in the last bit
    decode_kernels.add_rms_norm(hidden, None, norm.weight, norm.variance_epsilon, normed)
    torch.testing.assert_close(normed, norm(hidden), atol=0, rtol=1e-2)


def test_silu_mul_matches_torch():
    gate_up = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    out = decode_kernels.silu_mul(gate_up, torch.empty(3, 1500, dtype=DTYPE, device=DEVICE))
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, atol=0, rtol=1e-2)  # to the last bit


def tiny_hybrid(in_proj_bias: bool = False, shape: str = "tiny") -> HybridForCausalLM:
    """`shape` "smollm2": SmolLM2-135M's layer shapes (hidden 576, GQA 9/3: three query heads a KV head,
    not a power of two; head_dim 64; tied embeddings) on four layers."""
    torch.manual_seed(0)
    if shape == "smollm2":
        config = HybridConfig(
            vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, layer_types=["attention", "mamba", "attention", "mamba"],
            mamba_d_inner=576, mamba_d_xb=192, mamba_d_state=16, mamba_dt_rank=16, tie_word_embeddings=True,
            mamba_in_proj_bias=in_proj_bias)
    else:
        config = HybridConfig(
            vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, layer_types=["attention", "mamba", "identity", "attention"],
            mamba_d_inner=128, mamba_d_xb=32, mamba_d_state=8, mamba_dt_rank=8, attention_bias=True,
            mamba_in_proj_bias=in_proj_bias,
        )
    model = HybridForCausalLM(config)
    with torch.no_grad():  # Mamba weights large enough that a wrong input to its step shows in the states
        for index, kind in enumerate(config.layer_types):
            if kind == MAMBA:
                for parameter in model.model.layers[index].mixer.parameters():  # (std 0.3 at width 128)
                    parameter.normal_(0.0, 0.3 * (128 / config.hidden_size) ** 0.5)
    return model.to(DEVICE, DTYPE).eval()


@pytest.mark.parametrize(("in_proj_bias", "shape"), [(False, "tiny"), (True, "tiny"), (False, "smollm2")])
def test_fused_engine_matches_the_plain_engine_step_by_step(in_proj_bias, shape):
    # in_proj and dt_in_proj fused in one GEMM, or not; and the real teacher's shapes
    model = tiny_hybrid(in_proj_bias, shape)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 20), generator=generator).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    plain = GenerationEngine(model, 3, 40, fused=False, cuda_graph=False)
    fused = GenerationEngine(model, 3, 40, fused=True)
    assert fused.fused and not plain.fused
    for engine in (plain, fused):
        engine.generate(ids, mask, max_new_tokens=1)  # prefill only; the caches hold the prompt
        engine.tokens.copy_(plain.tokens)
    for step in range(12):  # teacher-forced on the plain engine's tokens so the two stay comparable
        with use_kernels("reference"):  # the plain engine on the composed PyTorch Mamba step
            plain._run_step()
        fused._run_step()
        torch.testing.assert_close(fused.last_logits.float(), plain.last_logits.float(), atol=5e-2, rtol=5e-2)
        for index in plain.ssm:  # the Mamba states themselves, not only logits a random model barely moves
            # (x comes from one GEMM of in_proj + dt_in_proj in the fused engine, from in_proj alone in the
            # plain one: equal up to bf16 rounding; B or C read from wrong columns is an O(1) error)
            for fused_state, plain_state in ((fused.conv[index], plain.conv[index]), (fused.ssm[index], plain.ssm[index])):
                scale = plain_state.float().abs().max()
                assert (fused_state.float() - plain_state.float()).abs().max() / scale < 5e-2, (step, index)
        fused.tokens.copy_(plain.tokens)
    if DEVICE.type == "cuda":
        assert fused.graph is not None  # the fused step was captured and replayed


def test_fused_engine_generates_the_same_tokens_with_and_without_a_cuda_graph():
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    model = tiny_hybrid()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    eager = GenerationEngine(model, 2, 30, fused=True, cuda_graph=False).generate(ids, max_new_tokens=16)
    graphed = GenerationEngine(model, 2, 30, fused=True, cuda_graph=True).generate(ids, max_new_tokens=16)
    assert torch.equal(eager.tokens, graphed.tokens)
