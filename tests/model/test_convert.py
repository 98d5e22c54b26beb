"""MIL initialisation, GQA expansions, weight surgery and the errors a user can hit."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

from pipeline.convert import ConversionError, hybridize, mamba_trial
from pipeline.model import HybridConfig, HybridConfigError
from pipeline.model.mixers import gqa_expansion_index

from tests.model.helpers import BASE, make_teacher


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_mil_maps_attention_into_mamba(family):
    teacher = make_teacher(family)
    hybrid = hybridize(teacher, [2])
    attention, mixer = teacher.model.layers[2].self_attn, hybrid.model.layers[2].mixer
    d_inner, d_xb = mixer.d_inner, mixer.d_xb
    assert (d_inner, d_xb) == (4 * 32, 2 * 32)  # n_heads x head_dim, n_kv_heads x head_dim
    w = mixer.in_proj.weight
    assert torch.equal(w[d_inner: d_inner + d_xb], attention.v_proj.weight)  # x <- v
    assert torch.equal(w[d_inner + d_xb: d_inner + 2 * d_xb], attention.k_proj.weight)  # B <- k
    assert torch.equal(w[d_inner + 2 * d_xb:], attention.q_proj.weight)  # C <- q
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    if attention.q_proj.bias is not None:
        b = mixer.in_proj.bias
        assert torch.equal(b[d_inner + 2 * d_xb:], attention.q_proj.bias)
        assert torch.equal(b[d_inner: d_inner + d_xb], attention.v_proj.bias)
        assert torch.count_nonzero(b[:d_inner]) == 0
    assert (mixer.out_proj.bias is not None) == (attention.o_proj.bias is not None)
    assert torch.allclose(mixer.A_log[0].exp(), torch.arange(1, 17, dtype=torch.float32))
    assert torch.equal(mixer.D, torch.ones(d_inner))
    assert mixer.A_log.dtype == torch.float32
    # every other weight is the teacher's, untouched
    teacher_state = teacher.state_dict()
    for key, value in hybrid.state_dict().items():
        if ".layers.2.mixer." in key:
            continue
        assert torch.equal(value, teacher_state[key.replace(".mixer.", ".self_attn.")]), key


def test_gqa_expansions():
    # d_inner 8, d_xb 4 (repeat 2); chunk unit 2 repeats chunks [0,1],[2,3] each twice
    assert gqa_expansion_index(8, 4, unit=2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    # head-aligned with head_dim 4: query heads 0,1 read KV head 0
    assert gqa_expansion_index(8, 4, unit=4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    teacher = make_teacher("llama")
    chunk = hybridize(teacher, [1], gqa_expansion="chunk")
    aligned = hybridize(teacher, [1], gqa_expansion="head_aligned")
    ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(chunk(ids).logits, aligned(ids).logits)
    index = aligned.model.layers[1].mixer.expand_index(torch.device("cpu"))
    # query head h (32 dims) reads KV head h // 2, as attention pairs them
    assert index[32 * 3: 32 * 4].tolist() == list(range(32, 64))


def test_progressive_conversion_of_a_hybrid_keeps_existing_mamba_layers():
    teacher = make_teacher("qwen2")
    first = hybridize(teacher, [1], d_state=8)
    second = hybridize(first, [3])
    assert second.config.layer_pattern == "AMAM"
    assert second.config.mamba_d_state == 8
    for key, value in first.state_dict().items():
        if ".layers.3." not in key:
            assert torch.equal(value, second.state_dict()[key]), key
    with pytest.raises(ConversionError, match="layer 1 is already Mamba"):
        hybridize(second, [1])
    with pytest.raises(ConversionError, match="differ from the source hybrid"):
        hybridize(first, [0], d_state=16)


def test_mamba_trial_swaps_one_mixer_into_the_parent_and_puts_it_back():
    parent = hybridize(make_teacher("qwen2"), [1], d_state=8)  # attention biases: the MIL bias rows too
    before = {key: value.clone() for key, value in parent.state_dict().items()}
    attention = parent.model.layers[2].mixer
    copied = hybridize(parent, [2], seed=5)  # what a trial used to build: a whole second model
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 7))
    with mamba_trial(parent, 2, seed=5) as trial:
        assert trial is parent and trial.config.layer_pattern == "AMMA"
        mixer = parent.model.layers[2].mixer
        # the MIL-mapped parts are hybridize's; the random parts differ (drawn for this mixer alone)
        d_inner = mixer.d_inner
        expected = copied.model.layers[2].mixer
        assert torch.equal(mixer.in_proj.weight[d_inner:], expected.in_proj.weight[d_inner:])
        assert torch.equal(mixer.in_proj.bias, expected.in_proj.bias)
        assert torch.equal(mixer.out_proj.weight, expected.out_proj.weight)
        assert torch.equal(mixer.A_log, expected.A_log) and torch.equal(mixer.D, expected.D)
        # with hybridize's random parts too, the swapped parent is the same network as the copy
        mixer.load_state_dict(expected.state_dict())
        torch.testing.assert_close(trial(input_ids).logits, copied(input_ids).logits, rtol=0, atol=0)
    assert parent.model.layers[2].mixer is attention and parent.config.layer_pattern == "AMAA"
    after = parent.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    with pytest.raises(ConversionError, match="layer 1 is already Mamba"):
        with mamba_trial(parent, 1):
            pass


def test_unsupported_architectures_are_named_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConversionError, match=r"unsupported teacher architecture GPT2LMHeadModel; supported: "
                                              r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        hybridize(gpt2, [0])
    mixtral = MixtralForCausalLM(MixtralConfig(**{**BASE, "num_local_experts": 2, "num_experts_per_tok": 1}))
    with pytest.raises(ConversionError, match="unsupported teacher architecture MixtralForCausalLM"):
        hybridize(mixtral, [0])


@pytest.mark.parametrize(
    "layers, message",
    [([4], "layer index 4 is out of range for a 4-layer model"),
     ([-1], "layer index -1 is out of range"),
     ([1, 2, 1], r"layer indices repeated: \[1\]")],
)
def test_bad_layer_indices(layers, message):
    with pytest.raises(ConversionError, match=message):
        hybridize(make_teacher("llama"), layers)


def test_d_inner_not_divisible_by_d_state():
    with pytest.raises(ValueError, match=r"mamba_d_inner \(128\) is not divisible by mamba_d_state \(24\)"):
        hybridize(make_teacher("llama"), [0], d_state=24)
    with pytest.raises(HybridConfigError, match="not divisible by mamba_d_state"):
        HybridConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, mamba_d_state=24)


def test_unknown_layer_type_in_config():
    with pytest.raises(HybridConfigError, match=r"unknown layer type 'sliding' at layer 1; valid types: "):
        HybridConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_types=["mamba", "sliding"])
    with pytest.raises(HybridConfigError, match="layer_types has 1 entries but num_hidden_layers is 2"):
        HybridConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_types=["mamba"])


def test_unknown_mamba_option():
    with pytest.raises(ConversionError, match=r"unknown Mamba option\(s\) \['d_stat'\]"):
        hybridize(make_teacher("llama"), [0], d_stat=16)
