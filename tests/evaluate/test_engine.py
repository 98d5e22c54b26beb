"""The measurement engine generates exactly what the model's own generate() does."""

import pytest
import torch

from pipeline.convert import hybridize
from pipeline.evaluate.engine import GenerationEngine

from tests.model.helpers import VOCAB, make_teacher, randomise


def build(pattern_mamba, identity=()):
    hybrid = hybridize(make_teacher("mistral", num_hidden_layers=5), pattern_mamba, identity_layers=identity)
    randomise(hybrid)
    with torch.no_grad():
        hybrid.model.embed_tokens.weight[hybrid.config.pad_token_id].normal_()
    return hybrid.eval()


@pytest.mark.parametrize("mamba, identity", [([], ()), ([1, 3], (2,)), ([0, 1, 2, 3, 4], ())])
def test_engine_matches_generate_on_left_padded_prompts(mamba, identity):
    hybrid = build(mamba, identity)
    pad = hybrid.config.pad_token_id
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (7, 12, 3)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), pad)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    new = 10
    engine = GenerationEngine(hybrid, batch_size=3, max_length=width + new, prefill_batch=2)
    result = engine.generate(ids, mask, max_new_tokens=new)
    if hybrid.config.attention_layers:  # generate() needs an attention layer to count cached tokens
        expected = hybrid.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=pad, eos_token_id=None)[:, width:]
        assert torch.equal(result.tokens, expected)
    # and each prompt alone gives the same tokens as in the batch
    for row, prompt in enumerate(prompts):
        alone = GenerationEngine(hybrid, batch_size=1, max_length=len(prompt) + new).generate(
            prompt[None], max_new_tokens=new)
        assert torch.equal(alone.tokens[0], result.tokens[row])
    assert result.tokens_per_s > 0 and result.prefill_s > 0


def test_engine_reuse_resets_state():
    hybrid = build([0, 2])
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    engine = GenerationEngine(hybrid, batch_size=2, max_length=20)
    first = engine.generate(ids, max_new_tokens=8).tokens
    second = engine.generate(ids, max_new_tokens=8).tokens
    assert torch.equal(first, second)


def test_bytes_per_step_counts_weights_and_caches():
    hybrid = build([0, 2])
    engine = GenerationEngine(hybrid, batch_size=2, max_length=32)
    weights = sum(p.numel() * 4 for n, p in hybrid.named_parameters() if "embed_tokens" not in n)
    assert engine.bytes_per_decode_step() > weights
    assert engine.cache_bytes() == sum(
        t.numel() * t.element_size()
        for group in (engine.keys, engine.values, engine.conv, engine.ssm) for t in group.values())


def test_engine_refuses_a_wrong_batch():
    hybrid = build([1])
    engine = GenerationEngine(hybrid, batch_size=2, max_length=16)
    with pytest.raises(ValueError, match="built for batch 2"):
        engine.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)


def test_engine_leaves_the_model_untouched():
    hybrid = build([1, 3])
    hybrid.train()
    before = {name: (param.data_ptr(), param.detach().clone()) for name, param in hybrid.named_parameters()}
    engine = GenerationEngine(hybrid, batch_size=2, max_length=16)
    engine.generate(torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2)), max_new_tokens=4)
    assert hybrid.training  # generate ran in eval mode and gave the mode back
    for name, param in hybrid.named_parameters():
        pointer, value = before[name]
        assert param.data_ptr() == pointer, f"{name} was re-pointed"
        assert torch.equal(param.detach(), value), f"{name} changed"
    with torch.no_grad():  # the engine holds copies: changing the model afterwards does not reach them
        hybrid.model.layers[0].mixer.q_proj.weight.zero_()
    assert engine.fused_qkv[0][0].abs().sum() > 0


def test_engine_stops_at_eos_and_pads_after_it():
    hybrid = build([0, 2])
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    engine = GenerationEngine(hybrid, batch_size=3, max_length=6 + 24)
    free = engine.generate(ids, max_new_tokens=24).tokens
    eos = int(free[0, 2])  # a token the first sequence writes at its third step: its end, by decree
    stopped = engine.generate(ids, max_new_tokens=24, eos_token_id=eos, check_every=1)
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) if len(hits) else None
        got = stopped.tokens[row]
        if end is None:  # never ended: identical to the free run over the steps run
            assert torch.equal(got, free[row, : got.shape[0]])
        else:
            assert torch.equal(got[: end + 1], free[row, : end + 1])
            assert bool((got[end:] == eos).all())
    if all(bool((free[row, :24] == eos).any()) for row in range(3)):
        assert stopped.new_tokens < 24


def test_engine_stops_at_any_of_several_stop_ids():
    """Several stop ids (eos and a template's end of turn): each sequence ends at the first of them it
    writes, and what follows holds the first id of the list, as generate() with a list of eos ids does."""
    hybrid = build([1])
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    engine = GenerationEngine(hybrid, batch_size=3, max_length=6 + 24)
    free = engine.generate(ids, max_new_tokens=24).tokens
    stops = [int(free[0, 3]), int(free[1, 1])]  # the second ends row 1 early, the first row 0
    stopped = engine.generate(ids, max_new_tokens=24, eos_token_id=stops, check_every=1).tokens
    reference = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                eos_token_id=stops, pad_token_id=stops[0])[:, 6:]
    for row in range(3):
        hit = torch.isin(free[row], torch.tensor(stops)).nonzero()
        end = int(hit[0]) if len(hit) else 24
        assert torch.equal(stopped[row, : end + 1], free[row, : end + 1])
        assert bool((stopped[row, end + 1:] == stops[0]).all())
        assert torch.equal(stopped[row, : reference.shape[1]], reference[row, : stopped.shape[1]])
    assert int(torch.isin(free[1, :2], torch.tensor(stops)).sum()) >= 1


@pytest.mark.parametrize("prefill_tokens, forwards", [(16384, 1), (18, 2), (9, 4), (1, 4)])
def test_throughput_prefills_as_many_rows_as_fit_the_token_budget(prefill_tokens, forwards):
    """Short prompts are prefilled as one batch (a row-by-row prefill measures kernel launches), long
    ones row by row; the count of model forwards per timed generation says which."""
    from pipeline.evaluate.throughput import generation_throughput

    hybrid = build([1, 3])
    calls = []
    handle = hybrid.model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        speed = generation_throughput(hybrid, batch_size=4, prompt_length=9, new_tokens=5, repeats=1,
                                      prefill_tokens=prefill_tokens)
    finally:
        handle.remove()
    # the engine's decode steps run the layers themselves: the inner model's forward is the prefill only,
    # once in the warm-up generation and once in the timed one
    assert speed.batch_size == 4 and speed.decode_tokens_per_s > 0
    assert len(calls) == 2 * forwards
