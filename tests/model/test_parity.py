"""An all-attention hybrid is the teacher; caches reproduce the full forward; padding does not leak."""

import pytest
import torch

from pipeline.convert import hybridize
from pipeline.model import HybridForCausalLM, cache_of

from tests.model.helpers import FAMILIES, VOCAB, make_teacher, randomise


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_mamba_conversion_reproduces_teacher_logits(family):
    teacher = make_teacher(family)
    hybrid = hybridize(teacher, [])
    assert isinstance(hybrid, HybridForCausalLM)
    ids = torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # one left-padded row
    with torch.no_grad():
        expected = teacher(ids, attention_mask=mask).logits
        got = hybrid(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4
    # The copy really is the teacher's: same number of parameters, weights equal by name.
    assert sum(p.numel() for p in hybrid.parameters()) == sum(p.numel() for p in teacher.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_layers_change_the_output(family):
    teacher = make_teacher(family)
    hybrid = hybridize(teacher, [1, 2])
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hybrid(ids).logits - teacher(ids).logits).abs().max().item() > 1e-3


def mixed_hybrid(seed: int = 0) -> HybridForCausalLM:
    """A, M, I, M, A: every mixer kind, with non-zero conv bias, pad embedding and norms."""
    teacher = make_teacher("qwen2", seed=seed, num_hidden_layers=5)
    hybrid = hybridize(teacher, [1, 3], identity_layers=[2], seed=seed)
    randomise(hybrid)
    with torch.no_grad():
        hybrid.model.embed_tokens.weight[hybrid.config.pad_token_id].normal_()
    assert hybrid.config.layer_pattern == "AMIMA"
    return hybrid.eval()


def test_prefill_then_decode_matches_full_forward():
    hybrid = mixed_hybrid()
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
    """A multi-token step after a prefill (chunked prefill) starts the scan and the conv from the cache."""
    hybrid = mixed_hybrid(seed=1)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = hybrid(ids, use_cache=False).logits
        first = hybrid(ids[:, :11], use_cache=True)
        cache = cache_of(first)
        second = hybrid(ids[:, 11:], cache=cache, attention_mask=torch.ones(2, 30))
    assert (torch.cat([first.logits, second.logits], dim=1) - full).abs().max().item() <= 1e-4


def test_left_padded_batch_generates_as_each_prompt_alone():
    hybrid = mixed_hybrid(seed=2)
    pad = hybrid.config.pad_token_id
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (9, 4, 14)]
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=pad, eos_token_id=None, min_new_tokens=12)
    with torch.no_grad():
        together = hybrid.generate(batch, attention_mask=mask, **settings)[:, width:]
        for row, prompt in enumerate(prompts):
            alone = hybrid.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    **settings)[:, len(prompt):]
            assert torch.equal(together[row], alone[0]), f"row {row}: {together[row].tolist()} != {alone[0].tolist()}"


def test_left_padding_does_not_change_logits_of_real_tokens():
    hybrid = mixed_hybrid(seed=3)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    padded = torch.cat([torch.full((1, 6), hybrid.config.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = hybrid(ids).logits
        with_pad = hybrid(padded, attention_mask=mask).logits[:, 6:]
    assert (alone - with_pad).abs().max().item() <= 1e-4
