"""Gated DeltaNet: the reference kernels against the definition; the mixer's caches, padding, generate() and
engine; its initialisation from attention; its configuration on disk."""

import json

import pytest
import torch

from pipeline.convert import ConversionError, gdn_trial, hybridize
from pipeline.evaluate.engine import GenerationEngine
from pipeline.model import HybridConfig, HybridForCausalLM, cache_of
from pipeline.model.config import GDN, GDN_FIELDS
from pipeline.model.kernels import (
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_rule_step,
    use_kernels,
)
from pipeline.model.mixers import GatedDeltaNetMixer

from tests.model.helpers import VOCAB, make_teacher, randomise
from tests.model.oracles import gated_delta_rule_naive


def delta_inputs(batch=2, length=37, heads=3, dim=16, value_dim=8, seed=0, decay=2.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(batch, length, heads, dim, generator=g),
        k=torch.randn(batch, length, heads, dim, generator=g),
        v=torch.randn(batch, length, heads, value_dim, generator=g),
        g=-torch.rand(batch, length, heads, generator=g) * decay,
        beta=torch.rand(batch, length, heads, generator=g),
    )


SCALE = 16**-0.5


@pytest.mark.parametrize("length", [1, 5, 32, 77])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_delta_rule_matches_per_token_recurrence(length, with_state):
    x = delta_inputs(length=length)
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1)) if with_state else None
    o, last = gated_delta_rule_reference(**x, scale=SCALE, initial_state=initial)
    o_ref, last_ref = gated_delta_rule_naive(**x, scale=SCALE, initial_state=initial)
    assert (o - o_ref).abs().max().item() <= 1e-5
    assert (last - last_ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    x = delta_inputs(length=50)
    o32, last32 = gated_delta_rule_reference(**x, scale=SCALE)
    o, last = gated_delta_rule_reference(**x, scale=SCALE, chunk=chunk)
    assert (o - o32).abs().max().item() <= 1e-5 and (last - last32).abs().max().item() <= 1e-5


def test_reference_delta_rule_gradients_match_per_token_recurrence():
    leaves = {k: v.clone().requires_grad_(True) for k, v in delta_inputs(length=45).items()}
    state = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    o, last = gated_delta_rule_reference(**leaves, scale=SCALE, initial_state=state)
    (o.square().sum() + last.sin().sum()).backward()
    grads = {k: v.grad.clone() for k, v in leaves.items()} | {"state": state.grad.clone()}
    leaves_ref = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    state_ref = state.detach().clone().requires_grad_(True)
    o_ref, last_ref = gated_delta_rule_naive(**leaves_ref, scale=SCALE, initial_state=state_ref)
    (o_ref.square().sum() + last_ref.sin().sum()).backward()
    expected = {k: v.grad for k, v in leaves_ref.items()} | {"state": state_ref.grad}
    for name, grad in grads.items():
        error = (grad - expected[name]).norm() / expected[name].norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def test_split_sequence_continues_from_the_state():
    x = delta_inputs(length=40)
    whole, last = gated_delta_rule_reference(**x, scale=SCALE)
    first = {k: v[:, :13] for k, v in x.items()}
    second = {k: v[:, 13:] for k, v in x.items()}
    o1, state = gated_delta_rule_reference(**first, scale=SCALE)
    o2, last2 = gated_delta_rule_reference(**second, scale=SCALE, initial_state=state)
    assert (torch.cat([o1, o2], 1) - whole).abs().max().item() <= 1e-5
    assert (last2 - last).abs().max().item() <= 1e-5


def test_decode_step_matches_the_recurrence_and_updates_in_place():
    x = delta_inputs(length=9)
    state = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(3))
    o_ref, last_ref = gated_delta_rule_naive(**x, scale=SCALE, initial_state=state)
    address = state.data_ptr()
    outs = [gated_delta_rule_step(state, *(x[name][:, t] for name in ("q", "k", "v", "g", "beta")), SCALE)
            for t in range(9)]
    assert state.data_ptr() == address
    assert (torch.stack(outs, 1) - o_ref).abs().max().item() <= 1e-5
    assert (state - last_ref).abs().max().item() <= 1e-5


def test_strong_decay_and_long_chunks_stay_finite():
    x = delta_inputs(length=130, decay=400.0)  # log decays of hundreds per token: exp(+G) would overflow
    o, last = gated_delta_rule_reference(**x, scale=SCALE, chunk=64)
    o_ref, _ = gated_delta_rule_naive(**x, scale=SCALE)
    assert torch.isfinite(o).all() and torch.isfinite(last).all()
    assert (o - o_ref).abs().max().item() <= 1e-4


def test_dispatch_runs_the_reference_on_cpu():
    x = delta_inputs(length=20)
    with use_kernels("auto"):
        o, last = gated_delta_rule(**x, scale=SCALE, return_last_state=True)
    o_ref, last_ref = gated_delta_rule_reference(**x, scale=SCALE)
    assert torch.equal(o, o_ref) and torch.equal(last, last_ref)


# --- the mixer in a model ------------------------------------------------------------------------

@torch.no_grad()
def randomise_gdn(model: HybridForCausalLM, seed: int = 0) -> None:
    """Every Gated DeltaNet weight non-trivial (a converted mixer starts with its output gate at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        mixer = layer.mixer
        if isinstance(mixer, GatedDeltaNetMixer):
            for parameter in (mixer.in_proj.weight, mixer.conv1d.weight):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            mixer.A_log.copy_(torch.rand(mixer.A_log.shape, generator=generator) * 2 - 2)
            mixer.dt_bias.copy_(torch.randn(mixer.dt_bias.shape, generator=generator))
            mixer.norm.weight.copy_(1 + 0.1 * torch.randn(mixer.norm.weight.shape, generator=generator))


def gdn_hybrid(seed: int = 0, family: str = "qwen2") -> HybridForCausalLM:
    """A, G, M, I, G: Gated DeltaNet beside every other kind, every weight and the pad embedding non-zero."""
    teacher = make_teacher(family, seed=seed, num_hidden_layers=5)
    hybrid = hybridize(teacher, [2], identity_layers=[3], gdn_layers=[1, 4], seed=seed)
    randomise(hybrid)
    randomise_gdn(hybrid, seed)
    with torch.no_grad():
        hybrid.model.embed_tokens.weight[hybrid.config.pad_token_id].normal_()
    assert hybrid.config.layer_pattern == "AGMIG"
    return hybrid.eval()


def test_prefill_then_decode_matches_full_forward():
    hybrid = gdn_hybrid()
    ids = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = hybrid(ids, use_cache=False).logits
        out = hybrid(ids[:, :20], use_cache=True)
        cache, pieces = cache_of(out), [out.logits]
        for t in range(20, 33):
            out = hybrid(ids[:, t: t + 1], cache=cache, attention_mask=torch.ones(2, t + 1))
            pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


def test_chunked_prefill_continues_from_cached_state():
    hybrid = gdn_hybrid(seed=1)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = hybrid(ids, use_cache=False).logits
        first = hybrid(ids[:, :2], use_cache=True)  # shorter than the conv: the window is padded
        cache = cache_of(first)
        second = hybrid(ids[:, 2:11], cache=cache, attention_mask=torch.ones(2, 11))
        third = hybrid(ids[:, 11:], cache=cache, attention_mask=torch.ones(2, 30))
    got = torch.cat([first.logits, second.logits, third.logits], dim=1)
    assert (got - full).abs().max().item() <= 1e-4


def left_padded(prompts, pad):
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return batch, mask


def test_left_padded_batch_generates_as_each_prompt_alone():
    hybrid = gdn_hybrid(seed=2)
    pad = hybrid.config.pad_token_id
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (9, 4, 14)]
    batch, mask = left_padded(prompts, pad)
    width = batch.shape[1]
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=pad, eos_token_id=None, min_new_tokens=12)
    with torch.no_grad():
        together = hybrid.generate(batch, attention_mask=mask, **settings)[:, width:]
        for row, prompt in enumerate(prompts):
            alone = hybrid.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    **settings)[:, len(prompt):]
            assert torch.equal(together[row], alone[0]), f"row {row}: {together[row].tolist()} != {alone[0].tolist()}"


def test_left_padding_does_not_change_logits_of_real_tokens():
    hybrid = gdn_hybrid(seed=3)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    padded = torch.cat([torch.full((1, 6), hybrid.config.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = hybrid(ids).logits
        with_pad = hybrid(padded, attention_mask=mask).logits[:, 6:]
    assert (alone - with_pad).abs().max().item() <= 1e-4


def test_engine_matches_generate_on_left_padded_prompts():
    hybrid = gdn_hybrid(seed=4, family="mistral")
    pad = hybrid.config.pad_token_id
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (7, 12, 3)]
    ids, mask = left_padded(prompts, pad)
    width, new = ids.shape[1], 10
    engine = GenerationEngine(hybrid, batch_size=3, max_length=width + new, prefill_batch=2)
    result = engine.generate(ids, mask, max_new_tokens=new)
    expected = hybrid.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=pad, eos_token_id=None)[:, width:]
    assert torch.equal(result.tokens, expected)
    for row, prompt in enumerate(prompts):
        alone = GenerationEngine(hybrid, batch_size=1, max_length=len(prompt) + new).generate(
            prompt[None], max_new_tokens=new)
        assert torch.equal(alone.tokens[0], result.tokens[row])
    states = sum(t.numel() * t.element_size() for t in [*engine.gdn_conv.values(), *engine.gdn_state.values()])
    assert states > 0 and engine.cache_bytes() == states + sum(
        t.numel() * t.element_size() for group in (engine.keys, engine.values, engine.conv, engine.ssm)
        for t in group.values())


def test_training_reaches_every_gdn_parameter():
    hybrid = gdn_hybrid(seed=5).train()
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))
    hybrid(ids, use_cache=False).logits.square().mean().backward()
    names = {name for name, _ in hybrid.mamba_parameters()}
    for name, parameter in hybrid.named_parameters():
        if ".mixer." in name and hybrid.config.layer_types[int(name.split(".")[2])] == GDN:
            assert name in names, f"{name} is not in the trainable set of trainable: mamba"
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_dtype_casts_keep_the_decay_parameters_fp32():
    hybrid = gdn_hybrid(seed=6).to(torch.bfloat16)
    mixer = hybrid.model.layers[1].mixer
    assert mixer.A_log.dtype == mixer.dt_bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16


# --- initialisation from attention ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_initialisation_copies_the_attention_weights(family):
    teacher = make_teacher(family)
    hybrid = hybridize(teacher, [], gdn_layers=[1, 3])
    config = hybrid.config
    assert (config.gdn_num_heads, config.gdn_num_kv_heads, config.gdn_head_dim) == (4, 2, 32)
    for index in (1, 3):
        attention, mixer = teacher.model.layers[index].self_attn, hybrid.model.layers[index].mixer
        q, k, v, z, beta, alpha = mixer.in_proj.weight.split(
            [mixer.q_width, mixer.kv_width, mixer.kv_width, mixer.q_width, mixer.num_heads, mixer.num_heads])
        assert torch.equal(q, attention.q_proj.weight) and torch.equal(k, attention.k_proj.weight)
        assert torch.equal(v, attention.v_proj.weight)
        assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
        assert not z.any() and not beta.any() and not alpha.any()  # gate 0, beta = 0.5, decay from A and dt_bias
        if attention.q_proj.bias is not None:
            bias = mixer.in_proj.bias
            assert torch.equal(bias[: mixer.q_width], attention.q_proj.bias)
            assert torch.equal(bias[mixer.q_width: mixer.q_width + mixer.kv_width], attention.k_proj.bias)
            assert not bias[mixer.conv_width:].any()
        else:
            assert mixer.in_proj.bias is None
        if attention.o_proj.bias is not None:
            assert torch.equal(mixer.out_proj.bias, attention.o_proj.bias)
        conv = mixer.conv1d.weight
        assert torch.equal(conv[:, 0, -1], torch.full_like(conv[:, 0, -1], 0.5)) and not conv[:, 0, :-1].any()
        assert torch.allclose(mixer.A_log.exp(), torch.full_like(mixer.A_log, 0.1))
        assert not mixer.dt_bias.any() and torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    # everything else is the teacher's, unchanged
    teacher_state = teacher.state_dict()
    for key, value in hybrid.state_dict().items():
        if ".mixer." not in key and key in teacher_state:
            assert torch.equal(value, teacher_state[key]), key


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_a_converted_layer_starts_as_the_teacher_without_that_attention(family):
    """The zeroed output gate: the new mixer adds nothing until trained (what leave-one-out measured)."""
    teacher = make_teacher(family)
    converted = hybridize(teacher, [], gdn_layers=[2])
    removed = hybridize(teacher, [], identity_layers=[2])
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, removed(ids).logits)


def test_initialisation_draws_nothing_random():
    teacher = make_teacher("qwen2")
    first, second = hybridize(teacher, [], gdn_layers=[1], seed=0), hybridize(teacher, [], gdn_layers=[1], seed=5)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_initialisation_sets_every_parameter(family):
    """gdn_from_attention overwrites every value a fresh mixer holds (so neither hybridize's constructor
    draws nor gdn_trial's unset memory survive): a mixer filled with NaN comes out finite."""
    from pipeline.convert import gdn_from_attention

    teacher = make_teacher(family)
    mixer = hybridize(teacher, [], gdn_layers=[1]).model.layers[1].mixer
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.fill_(float("nan"))
    assert not list(mixer.buffers())
    gdn_from_attention(mixer, teacher.model.layers[1].self_attn)
    for name, parameter in mixer.named_parameters():
        assert torch.isfinite(parameter).all(), name


def test_gdn_trial_draws_nothing_and_matches_hybridize():
    """An MMR trial of Gated DeltaNet uses no random stream (not the global one either) and holds the mixer
    `hybridize` makes for that layer."""
    hybrid = hybridize(make_teacher("qwen2", num_hidden_layers=5), [0])
    expected = hybridize(hybrid, [], gdn_layers=[3]).model.layers[3].mixer.state_dict()
    state = torch.random.get_rng_state()
    with gdn_trial(hybrid, 3) as student:
        got = student.model.layers[3].mixer.state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_steps_add_gdn_layers_to_a_hybrid_and_refuse_occupied_layers():
    teacher = make_teacher("mistral", num_hidden_layers=5)
    first = hybridize(teacher, [0], gdn_options={"conv_kernel": 3})  # no Gated DeltaNet layer yet: nothing to set
    assert first.config.layer_pattern == "MAAAA"
    second = hybridize(first, [], gdn_layers=[2], gdn_options={"conv_kernel": 3})
    assert second.config.layer_pattern == "MAGAA" and second.config.gdn_conv_kernel == 3
    assert second.model.layers[2].mixer.conv1d.weight.shape[-1] == 3
    third = hybridize(second, [4], gdn_layers=[1])  # keeps its own Gated DeltaNet settings
    assert third.config.layer_pattern == "MGGAM" and third.config.gdn_conv_kernel == 3
    with pytest.raises(ConversionError, match="differ from the source hybrid"):
        hybridize(second, [], gdn_layers=[1], gdn_options={"conv_kernel": 4})
    with pytest.raises(ConversionError, match="layer 2 is already Gated DeltaNet"):
        hybridize(second, [2])
    with pytest.raises(ConversionError, match="listed both as Mamba and as Gated DeltaNet"):
        hybridize(teacher, [1], gdn_layers=[1])
    with pytest.raises(ConversionError, match="unknown Gated DeltaNet option"):
        hybridize(teacher, [], gdn_layers=[1], gdn_options={"heads": 2})


def test_gdn_trial_swaps_one_mixer_and_puts_everything_back():
    hybrid = hybridize(make_teacher("qwen2", num_hidden_layers=5), [0])
    before = {key: value.clone() for key, value in hybrid.state_dict().items()}
    pattern = hybrid.config.layer_pattern
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(9))
    with gdn_trial(hybrid, 3) as student:
        assert student is hybrid and student.config.layer_pattern == "MAAGA"
        mixer = student.model.layers[3].mixer
        assert isinstance(mixer, GatedDeltaNetMixer) and mixer.in_proj.bias is not None  # Qwen2's q/k/v biases
        student(ids)
    assert hybrid.config.layer_pattern == pattern and not hybrid.config.gdn_in_proj_bias
    after = hybrid.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)
    with pytest.raises(ConversionError, match="already Mamba"):
        with gdn_trial(hybrid, 0):
            pass


# --- configuration and checkpoints -----------------------------------------------------------------

def test_gdn_settings_are_written_only_by_configs_with_gdn_layers(tmp_path):
    teacher = make_teacher("mistral")
    mamba_only = hybridize(teacher, [1])
    mamba_only.save_pretrained(tmp_path / "mamba")
    body = json.loads((tmp_path / "mamba" / "config.json").read_text())
    assert not [key for key in body if key.startswith("gdn_")]  # Mamba-only config.json as before GDN existed
    with_gdn = hybridize(teacher, [1], gdn_layers=[2])
    with_gdn.save_pretrained(tmp_path / "gdn")
    body = json.loads((tmp_path / "gdn" / "config.json").read_text())
    assert body["layer_types"][2] == "gated_delta_net" and all(name in body for name in GDN_FIELDS)
    loaded = HybridForCausalLM.from_pretrained(tmp_path / "gdn").eval()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(10))
    randomise_gdn(with_gdn)
    randomise_gdn(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, with_gdn.eval()(ids).logits)


def test_short_names_and_validation():
    config = HybridConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                          intermediate_size=96, layer_types=["gdn", "gated_deltanet", "attention"])
    assert config.layer_types == [GDN, GDN, "full_attention"] and config.layer_pattern == "GGA"
    assert config.recurrent_layers == [0, 1] and config.gdn_layers == [0, 1]
    with pytest.raises(ValueError, match="gdn_num_heads \\(4\\) is not a multiple of gdn_num_kv_heads \\(3\\)"):
        HybridConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                     intermediate_size=96, gdn_num_kv_heads=3)


def test_fla_backward_is_refused_where_fla_core_says_it_is_wrong(monkeypatch):
    """fla-core 0.6 raises for its chunk backward on Hopper with Triton >= 3.4, < 3.7.1 (seen on the H200's
    Triton 3.6): training then takes the reference, forward-only calls keep fla-core."""
    import torch

    from pipeline.model.kernels import fla_backward_is_correct

    assert fla_backward_is_correct(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    assert not fla_backward_is_correct(cuda, "3.6.0") and not fla_backward_is_correct(cuda, "3.4.0")
    assert fla_backward_is_correct(cuda, "3.7.1") and fla_backward_is_correct(cuda, "3.3.1+git")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert fla_backward_is_correct(cuda, "3.6.0")
