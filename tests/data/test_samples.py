"""The teacher's own samples (data.generic=teacher): seeded CPU draws, left-padded batches, eos stops."""

from __future__ import annotations

import torch

from pipeline.data.samples import OPENINGS, _prefill, _sample, opening_order, sample_texts


def _teacher(tmp_path):
    from pipeline.stages.common import load_model, load_tokenizer
    from pipeline.config import HardwareConfig

    from tests.teachers import save_tiny_teacher

    folder = save_tiny_teacher(tmp_path / "teacher")
    return load_model(folder, HardwareConfig(device="cpu", precision="fp32"), "teacher"), load_tokenizer(folder)


def test_openings_cycle_in_a_seeded_order():
    assert len(set(OPENINGS)) == len(OPENINGS) >= 64
    first = opening_order(2 * len(OPENINGS), seed=3)
    assert first == opening_order(2 * len(OPENINGS), seed=3) != opening_order(2 * len(OPENINGS), seed=4)
    assert sorted(first[:len(OPENINGS)]) == sorted(OPENINGS) and first[len(OPENINGS):] == first[:len(OPENINGS)]


def test_same_seed_same_texts_and_each_starts_with_its_opening(tmp_path):
    model, tokenizer = _teacher(tmp_path)
    texts = sample_texts(model, tokenizer, 5, max_new_tokens=6, batch_size=3, seed=1)
    assert [t.text for t in texts] == [t.text for t in sample_texts(model, tokenizer, 5, max_new_tokens=6,
                                                                     batch_size=3, seed=1)]
    assert [t.text for t in texts] != [t.text for t in sample_texts(model, tokenizer, 5, max_new_tokens=6,
                                                                     batch_size=3, seed=2)]
    assert all(t.text.startswith(t.opening) and 0 <= t.new_tokens <= 6 for t in texts)


def test_a_left_padded_row_samples_as_it_would_alone(tmp_path, monkeypatch):
    """With the same uniform draw for every row of a step, a short prompt padded beside a long one gets the
    tokens it gets alone: the pad is masked and its positions start at its first token."""
    model, tokenizer = _teacher(tmp_path)
    short, long = [1, 40, 41], [1, 50, 51, 52, 53, 54, 55]

    def run(prompts):
        steps = iter(torch.rand(8, generator=torch.Generator().manual_seed(0)).tolist())
        monkeypatch.setattr(torch, "rand", lambda *shape, generator=None: torch.full(shape, next(steps)))
        try:
            return _sample(model, prompts, 8, 1.0, None, torch.Generator())
        finally:
            monkeypatch.undo()

    assert run([short, long])[0] == run([short])[0]
    with torch.no_grad():  # and its next-token logits are the ones it has alone
        padded, alone = _prefill(model, [short, long], 0)[1][0], _prefill(model, [short], 0)[1][0]
    assert torch.allclose(padded, alone, atol=1e-5), (padded - alone).abs().max()
