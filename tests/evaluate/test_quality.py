"""Answer accuracy through the engine gives the answers generate() gives (the CPU / PyTorch path)."""

import pytest
import torch

from pipeline.convert import hybridize
from pipeline.data import build_char_tokenizer
from pipeline.data.demo import DemoDataConfig, generate_demo_data
from pipeline.evaluate.quality import answer_accuracy
from pipeline.stages.loo import without_layer


@pytest.fixture(scope="module")
def problems():
    data = generate_demo_data(DemoDataConfig(n_train=8, n_validation=4, n_test=12, n_text_train=4,
                                             n_text_validation=4, n_text_test=4))
    rows = data.reasoning["test"]
    return [rows[i] for i in range(len(rows))]


def char_teacher(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():  # make the end-of-sequence token likely, so some answers stop early
        model.lm_head.weight[tokenizer.eos_token_id] += 0.5 * model.model.norm.weight
    return model.eval()


@pytest.mark.parametrize("mamba", [[], [0, 2]])
def test_engine_answers_equal_generate_answers(problems, mamba):
    tokenizer = build_char_tokenizer()
    model = hybridize(char_teacher(tokenizer), mamba) if mamba else char_teacher(tokenizer)
    kwargs = dict(batch_size=5, max_new_tokens=20)  # 12 problems: batches of 5, 5 and a short one of 2
    fast, fast_records = answer_accuracy(model, tokenizer, problems, **kwargs)
    slow, slow_records = answer_accuracy(model, tokenizer, problems, engine=False, **kwargs)
    assert [r["generated"] for r in fast_records] == [r["generated"] for r in slow_records]
    assert fast == slow
    assert any(len(r["generated"]) < 20 for r in slow_records)  # some stopped at eos: the stop is exercised


def test_loo_models_run_through_the_engine(problems):
    tokenizer = build_char_tokenizer()
    model = hybridize(char_teacher(tokenizer, seed=1), [])
    for mode in ("mixer", "block"):  # "block" has no decoder block at the index: generate() runs it
        with without_layer(model, 1, mode):
            fast, fast_records = answer_accuracy(model, tokenizer, problems[:6], batch_size=6, max_new_tokens=16)
            slow, slow_records = answer_accuracy(model, tokenizer, problems[:6], batch_size=6, max_new_tokens=16,
                                                 engine=False)
        assert [r["generated"] for r in fast_records] == [r["generated"] for r in slow_records]


def test_an_architecture_the_conversion_refuses_falls_back_but_another_error_is_not_swallowed(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    import pipeline.convert
    from pipeline.evaluate.quality import _engine_for

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    assert _engine_for(gpt2, batch_size=2, max_length=32) is None  # ConversionError: generate() runs it

    def broken(model, mamba_layers):
        raise RuntimeError("a bug in the conversion")

    monkeypatch.setattr(pipeline.convert, "hybridize", broken)
    tokenizer = build_char_tokenizer()
    with pytest.raises(RuntimeError, match="a bug in the conversion"):
        _engine_for(char_teacher(tokenizer), batch_size=2, max_length=32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mamba", [[], [0, 2]])
def test_engine_answers_equal_generate_answers_on_cuda(problems, mamba):
    """On the GPU: CUDA graph, the CUDA Mamba kernels where installed; fp32 so both paths round alike."""
    tokenizer = build_char_tokenizer()
    model = (hybridize(char_teacher(tokenizer), mamba) if mamba else char_teacher(tokenizer)).cuda()
    kwargs = dict(batch_size=5, max_new_tokens=20)
    fast, fast_records = answer_accuracy(model, tokenizer, problems, **kwargs)
    slow, slow_records = answer_accuracy(model, tokenizer, problems, engine=False, **kwargs)
    assert [r["generated"] for r in fast_records] == [r["generated"] for r in slow_records]
    assert fast == slow
