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
        # draw 0 of a layer is the conversion's own mixer, random parts included: the same network
        mixer, expected = parent.model.layers[2].mixer, copied.model.layers[2].mixer
        assert mixer.state_dict().keys() == expected.state_dict().keys()
        for key, value in expected.state_dict().items():
            assert torch.equal(mixer.state_dict()[key], value), key
        torch.testing.assert_close(trial(input_ids).logits, copied(input_ids).logits, rtol=0, atol=0)
    with mamba_trial(parent, 2, seed=5, draw=1) as trial:  # another initialisation: only the random parts move
        mixer, d_inner = parent.model.layers[2].mixer, expected.d_inner
        assert not torch.equal(mixer.in_proj.weight[:d_inner], expected.in_proj.weight[:d_inner])
        assert not torch.equal(mixer.dt_proj.bias, expected.dt_proj.bias)
        assert not torch.equal(mixer.conv1d.weight, expected.conv1d.weight)
        assert torch.equal(mixer.in_proj.weight[d_inner:], expected.in_proj.weight[d_inner:])
        assert torch.equal(mixer.out_proj.weight, expected.out_proj.weight)
    assert parent.model.layers[2].mixer is attention and parent.config.layer_pattern == "AMAA"
    after = parent.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    with pytest.raises(ConversionError, match="layer 1 is already Mamba"):
        with mamba_trial(parent, 1):
            pass


def _mixer_state(model, layer):
    return {key: value.clone() for key, value in model.model.layers[layer].mixer.state_dict().items()}


def test_fresh_mixers_depend_on_the_seed_and_layer_alone():
    teacher = make_teacher("llama")
    torch.manual_seed(1)
    first = hybridize(teacher, [1, 2], seed=3)
    torch.manual_seed(2)
    torch.rand(11)  # another global random state: nothing of the hybrid may come from it
    again = hybridize(teacher, [1, 2], seed=3)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # a layer's mixer does not depend on which other layers are converted with it
    alone = hybridize(teacher, [2], seed=3)
    for key, value in _mixer_state(first, 2).items():
        assert torch.equal(value, _mixer_state(alone, 2)[key]), key
    other_seed = _mixer_state(hybridize(teacher, [2], seed=4), 2)
    assert not torch.equal(other_seed["dt_proj.bias"], _mixer_state(alone, 2)["dt_proj.bias"])
    # the two layers drew different values
    assert not torch.equal(_mixer_state(first, 1)["conv1d.weight"], _mixer_state(first, 2)["conv1d.weight"])
    # hybridize leaves the caller's random stream where it was
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    hybridize(teacher, [0], seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_fresh_draws_are_made_on_the_cpu_whatever_the_ambient_device():
    from pipeline.convert import initialise_fresh, mixer_generator

    hybrid = hybridize(make_teacher("llama"), [1], seed=3)
    expected = _mixer_state(hybrid, 1)
    mixer = hybrid.model.layers[1].mixer
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.zero_()
    with torch.device("meta"):  # a default device other than the CPU (on a GPU machine: cuda)
        initialise_fresh(mixer, mixer_generator(3, 1), hybrid.config)
    d_inner = mixer.d_inner
    for key in ("dt_in_proj.weight", "dt_proj.weight", "dt_proj.bias", "conv1d.weight", "A_log", "D"):
        assert torch.equal(mixer.state_dict()[key], expected[key]), key
    assert torch.equal(mixer.in_proj.weight[:d_inner], expected["in_proj.weight"][:d_inner])


def test_fresh_mixer_distributions():
    teacher = make_teacher("mistral", num_hidden_layers=2)
    mixer = hybridize(teacher, [0], seed=0).model.layers[0].mixer
    d_inner, std = mixer.d_inner, teacher.config.initializer_range
    z = mixer.in_proj.weight[:d_inner]
    assert abs(z.std().item() - std) < 0.15 * std and abs(z.mean().item()) < 0.2 * std
    assert mixer.conv1d.bias is None or torch.count_nonzero(mixer.conv1d.bias) == 0
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj.weight.std() > bound / 3
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)  # log-uniform in [dt_min, dt_max] = [1e-3, 0.1]
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.log().std() > 0.8  # spread over the two decades, not one value


def test_trial_mixer_in_bf16_is_the_conversions():
    parent = hybridize(make_teacher("qwen2"), [1]).to(torch.bfloat16)
    converted = hybridize(parent, [3], seed=2)
    with mamba_trial(parent, 3, seed=2) as trial:
        state = _mixer_state(trial, 3)
    for key, value in _mixer_state(converted, 3).items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert state["A_log"].dtype == torch.float32 and state["in_proj.weight"].dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_seed_gives_the_same_hybrid_on_cuda_as_on_the_cpu():
    teacher = make_teacher("qwen2")
    on_cpu = hybridize(teacher, [0, 2], seed=11)
    on_cuda = hybridize(make_teacher("qwen2").cuda(), [0, 2], seed=11)
    for key, value in on_cpu.state_dict().items():
        assert torch.equal(value, on_cuda.state_dict()[key].cpu()), key
    parent_cpu, parent_cuda = hybridize(teacher, [0]), hybridize(make_teacher("qwen2").cuda(), [0])
    for draw in (0, 1):
        with mamba_trial(parent_cpu, 2, seed=11, draw=draw) as trial:
            expected = _mixer_state(trial, 2)
        with mamba_trial(parent_cuda, 2, seed=11, draw=draw) as trial:
            got = _mixer_state(trial, 2)
        for key, value in expected.items():
            assert torch.equal(value, got[key].cpu()), (draw, key)


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
