"""The real pretrained teacher, SmolLM2-135M-Instruct, through what a user's teacher meets first: the GGUF
read by the plan (header only) and dequantised by the teacher stage, the MIL conversion at zero Mamba
layers, one distillation step with the settings for pretrained teachers. CPU, about a minute."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from pipeline.config import HardwareConfig, RunConfig, TeacherConfig, pretrained_distill  # noqa: E402
from pipeline.model.gguf import (  # noqa: E402
    GGUFError,
    find_gguf,
    load_gguf,
    load_gguf_tokenizer,
    read_header,
    restore_special_tokens,
)

CPU = HardwareConfig(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    torch.set_num_threads(2)
    return load_gguf(smollm2_gguf)


def _prompt(tokenizer, text: str):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def test_header_is_read_without_the_weights(smollm2_gguf):
    header = read_header(smollm2_gguf)
    assert header.architecture == "LlamaForCausalLM" and header.file_type == "MOSTLY_Q4_1"
    config = header.config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["head_dim"]) == (30, 576, 9, 3, 49152, 64)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 1e5
    assert "<|im_start|>" in header.chat_template and "{% generation %}" not in header.chat_template
    assert find_gguf(smollm2_gguf.parent) in (smollm2_gguf, None)  # the cache folder also holds the wheel


def test_special_tokens_are_the_files(smollm2_gguf):
    """eos and pad are what the GGUF records (<|im_end|>, the end of an assistant turn), whatever the
    transformers version reads: 5.17 made eos <|im_start|> and left no pad, so no answer ever stopped."""
    header = read_header(smollm2_gguf)
    assert header.special_tokens == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    tokenizer = load_gguf_tokenizer(smollm2_gguf)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None  # as transformers 5.17 loads it
    assert restore_special_tokens(tokenizer, header.special_tokens) == ["eos: <|im_start|> -> <|im_end|>",
                                                                        "pad: None -> <|im_end|>"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2)
    assert restore_special_tokens(tokenizer, header.special_tokens) == []  # nothing left to change


def test_plan_reads_a_gguf_teacher(smollm2_gguf, tmp_path):
    from pipeline.chain import local_teacher_source
    from pipeline.plan import plan
    from pipeline.store import open_store

    cfg = RunConfig(teacher=TeacherConfig(path=str(smollm2_gguf)), hardware=CPU).with_pretrained_settings()
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, counts=[15, 31]))
    checked = plan(cfg, store=open_store(str(tmp_path / "store")), work_root=tmp_path / "work",
                   teacher=lambda: local_teacher_source(cfg.teacher.path), until="teacher")
    assert any("exceeds the teacher's 30 layers" in problem for problem in checked.problems), checked.problems
    assert [row.name for row in checked.rows] == ["teacher"] and checked.rows[0].inputs == [str(smollm2_gguf)]


def test_teacher_stage_stores_the_dequantised_teacher(smollm2, smollm2_gguf, tmp_path):
    """The stage's folder is a plain Llama checkpoint (safetensors, tokenizer, ChatML template) whose logits
    are the GGUF's, and which answers as the published model does."""
    from pipeline.stages import import_teacher
    from pipeline.stages.common import load_model, load_tokenizer, read_meta

    meta = import_teacher(CPU, source=str(smollm2_gguf), out_dir=tmp_path / "teacher", work_dir=tmp_path / "w")
    assert meta["source"] == "gguf" and meta["quantization"] == "MOSTLY_Q4_1" and meta["layers"] == 30
    assert read_meta(tmp_path / "teacher")["architecture"] == "LlamaForCausalLM"
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    stored, tokenizer = load_model(tmp_path / "teacher", CPU, "teacher"), load_tokenizer(tmp_path / "teacher")
    model, gguf_tokenizer = smollm2
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = _prompt(tokenizer, "Write the capital of France.")
    with torch.no_grad():
        assert torch.equal(stored(**prompt).logits, model(**prompt).logits)
        answer = stored.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])


def test_mil_at_zero_mamba_layers_is_the_teacher(smollm2):
    from pipeline.convert import hybridize

    model, tokenizer = smollm2
    hybrid = hybridize(model, [])
    prompt = _prompt(tokenizer, "What is 17 + 25? Think step by step.")
    with torch.no_grad():
        difference = (hybrid(**prompt).logits - model(**prompt).logits).abs().max().item()
    assert difference <= 1e-4, difference
    assert hybrid.config.tie_word_embeddings and hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()


def test_distillation_with_pretrained_settings_lowers_the_loss(smollm2):
    """The MIL start of a real conversion, then steps at the pretrained settings' learning rate (no
    warm-up) on one batch: the reverse KL falls (at the demo's lr 2e-3 it rose on this model)."""
    from pipeline.convert import hybridize
    from pipeline.data import iter_batches, tokenize_rows
    from pipeline.train import train

    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is 12+35-7?"},
                                          {"role": "assistant", "content": "12+35=47\n47-7=40\nanswer: 40"}],
                                         tokenize=False)
    rows = tokenize_rows([{"text": text}, {"text": text.replace("12", "21")}], tokenizer, 96)
    batch = next(iter(iter_batches(rows, 2, tokenizer.pad_token_id, shuffle=False, stop=1)))
    student = hybridize(model, [4, 12, 22], seed=0)
    settings = dataclasses.replace(pretrained_distill(), steps=3, warmup_steps=0, batch_size=2, log_every=1,
                                   save_every=0)
    losses = []
    train(student, [batch], settings, teacher=model, callback=lambda metrics: losses.append(metrics.loss))
    assert len(losses) == 3 and losses[0] > 0.01
    assert losses[2] < losses[0], losses


def test_find_gguf_refuses_ambiguous_folders(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="holds 2 GGUF files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None  # a transformers folder, not a GGUF teacher


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04not a gguf")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        read_header(fake)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFError, match="unreadable GGUF header"):
        read_header(truncated)


def test_an_unsupported_architecture_is_one_line(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="'gpt2' model: unsupported GGUF architecture; supported: llama"):
        read_header(path)
