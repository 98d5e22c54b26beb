"""Models built sharded (`pipeline.convert.sharded`): the same weights and the same checkpoint files as the
unsharded path, and a rank's host memory well below the models' size.

In this process (a gloo group of one): the student of a conversion, built sharded and written back
(gathered through rank 0, or through DCP shards consolidated), gives the files `save_checkpoint` writes for
`hybridize`'s student, byte for byte, for a Llama teacher, a Qwen2 teacher (attention biases, untied
embeddings), a hybrid parent, a Gated DeltaNet layer beside a Mamba one and a save split over several
files; the sharded teacher holds `load_model`'s tensors and buffers. Under torchrun (two gloo processes, the stage's real launcher): a
200 MB teacher and its student are built with every rank's peak host memory measured (Linux's high-water
mark of the resident set, reset just before the building: see `HostMemory`) and the untrained student
written back is, again, the unsharded path's checkpoint byte for byte.
"""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
import torch.distributed as dist

from pipeline.config import DataConfig, HardwareConfig
from pipeline.convert import hybridize
from pipeline.convert.sharded import (
    ModelSource,
    build_sharded,
    consolidate,
    gathered_tensor,
    save_gathered,
    save_plan,
    save_sharded,
)
from pipeline.data import build_char_tokenizer
from pipeline.data.demo import DemoDataConfig
from pipeline.stages.common import StageError, load_model, load_tokenizer, save_checkpoint
from pipeline.stages.launch import MEMORY_FILE, RESULT_DIR, TrainingJob, check_source, train_sharded_under_torchrun
from pipeline.train import TrainConfig

CPU = HardwareConfig(device="cpu", precision="fp32")
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors")
# The per-rank bound the issue asks for: each rank's peak host memory while building student and teacher,
# over the two models' whole size. Two ranks hold half each, plus one layer's new mixer and attention.
MEMORY_BOUND = 0.6


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def save_teacher(folder, kind: str = "llama", *, hidden: int = 32, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 64):
    """A random teacher with the demo char tokenizer: a Llama (tied embeddings) or a Qwen2 (q/k/v biases,
    untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_char_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def same_files(left, right, names=CHECKPOINT_FILES) -> dict[str, bool]:
    return {name: filecmp.cmp(left / name, right / name, shallow=False) for name in names}


@pytest.mark.parametrize("kind,parent_layers,layers,gdn,save_dtype", [
    ("llama", None, (1, 2), (), "bfloat16"),
    ("qwen2", None, (0, 3), (), "float32"),
    ("llama", (1,), (2,), (), "float32"),  # a hybrid parent: its Mamba layer is copied, one more converted
    ("qwen2", None, (1,), (2,), "bfloat16"),  # a Mamba and a Gated DeltaNet layer, from attention with biases
])
def test_the_sharded_student_writes_the_unsharded_checkpoint_byte_for_byte(group, tmp_path, kind, parent_layers,
                                                                         layers, gdn, save_dtype):
    folder = save_teacher(tmp_path / "teacher", kind)
    if parent_layers is not None:  # a step's parent: H-1, saved as the convert stage saves it
        parent = hybridize(load_model(folder, CPU, "teacher", fp32=True), parent_layers, seed=5)
        save_checkpoint(parent, load_tokenizer(folder), tmp_path / "parent", "bfloat16")
        folder = tmp_path / "parent"
    gdn_options = {"conv_kernel": 4} if gdn else {}
    reference = hybridize(load_model(folder, CPU, "parent", fp32=True), layers, seed=3,
                          **({"gdn_layers": gdn, "gdn_options": gdn_options} if gdn else {}))
    student = build_sharded(ModelSource(str(folder), layers, 3, {}, gdn, gdn_options), dtype=torch.float32,
                            device=torch.device("cpu"), role="student")
    buffers = dict(reference.named_buffers())
    assert {name: torch.equal(buffer, buffers[name]) for name, buffer in student.named_buffers()} == \
        {name: True for name in buffers}
    save_checkpoint(reference, load_tokenizer(folder), tmp_path / "reference", save_dtype)
    save_gathered(student, tmp_path / "gathered", save_dtype, rank=0)
    save_sharded(student, tmp_path / "shards")
    consolidate(save_plan(student, save_dtype), tmp_path / "shards", tmp_path / "consolidated")
    every = {name: True for name in CHECKPOINT_FILES}
    assert same_files(tmp_path / "reference", tmp_path / "gathered") == every
    assert same_files(tmp_path / "reference", tmp_path / "consolidated") == every


def test_a_save_split_over_files_is_the_one_save_pretrained_splits(group, tmp_path):
    folder = save_teacher(tmp_path / "teacher", "qwen2")
    student = build_sharded(ModelSource(str(folder), (1,), 0), dtype=torch.float32, device=torch.device("cpu"),
                            role="student")
    reference = hybridize(load_model(folder, CPU, "teacher", fp32=True), [1], seed=0)
    reference.save_pretrained(tmp_path / "reference", max_shard_size="20KB")
    save_gathered(student, tmp_path / "gathered", "float32", rank=0, max_shard_size="20KB")
    names = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert "model.safetensors.index.json" in names and "model-00002-of-" in " ".join(names)
    assert sorted(path.name for path in (tmp_path / "gathered").iterdir()) == names
    assert same_files(tmp_path / "reference", tmp_path / "gathered", names) == {name: True for name in names}


def test_the_sharded_teacher_holds_the_loaded_teachers_tensors(group, tmp_path):
    folder = save_teacher(tmp_path / "teacher", "qwen2")
    bf16 = HardwareConfig(device="cpu", precision="bf16-mixed")
    loaded = load_model(folder, bf16, "teacher")  # frozen teachers are held in bf16 under bf16-mixed
    teacher = build_sharded(ModelSource(str(folder)), dtype=torch.bfloat16, device=torch.device("cpu"), role="teacher")
    for name, param in loaded.named_parameters():
        built = gathered_tensor(teacher, name)
        assert built.dtype == param.dtype and torch.equal(built, param), name
    buffers = dict(loaded.named_buffers())
    for name, buffer in teacher.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    assert not any(param.requires_grad for param in teacher.parameters())


def test_bad_sources_are_refused_from_their_headers_with_load_models_lines(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_teacher(tmp_path / "teacher")
    with pytest.raises(StageError, match="layer index 7 is out of range"):
        check_source(ModelSource(str(folder), (7,)), torch.float32, "teacher")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    del weights["model.layers.2.self_attn.k_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StageError, match=r"^teacher at .*: 1 weights have other shapes than its config.json says "
                                         r"\(e.g. model.layers.1.mlp.up_proj.weight \(63, 32\) vs \(64, 32\)\); the "
                                         r"weights do not belong to this config$"):
        check_source(ModelSource(str(folder)), torch.float32, "teacher")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StageError, match=r"^teacher at .*: 2 weights its config.json needs are not in its "
                                         r"safetensors files \(e.g. model.layers.1.mlp.up_proj.weight, "
                                         r"model.layers.2.self_attn.k_proj.weight\); the checkpoint is incomplete$"):
        check_source(ModelSource(str(folder), (3,)), torch.float32, "teacher")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])  # a copy cut short: the header is whole
    with pytest.raises(StageError, match=r"^teacher at .* cannot be loaded \(SafetensorsError: .* is truncated: its "
                                         r"header describes \d+ bytes, the file has \d+\); the files are truncated"):
        check_source(ModelSource(str(folder)), torch.float32, "teacher")


def test_two_ranks_build_a_200mb_pair_in_half_the_memory_with_the_unsharded_weights(tmp_path):
    """Through the stage's launcher, with no training step: what the ranks write back is the initial student."""
    folder = save_teacher(tmp_path / "teacher", hidden=768, layers=8, heads=12, kv_heads=4, intermediate=2048)
    layers, seed = (2, 5), 7
    data = DataConfig(max_length=32, demo=DemoDataConfig(n_train=16, n_validation=4, n_test=4, n_text_train=4,
                                                         n_text_validation=4, n_text_test=4))
    job = TrainingJob(train=TrainConfig(steps=1, batch_size=2, max_length=32, save_dtype="float32"), data=data,
                      batches="distill", state_dir=str(tmp_path / "state"), precision="fp32", device="cpu",
                      teacher_dir=str(folder), student=ModelSource(str(folder), layers, seed),
                      tokenizer_dir=str(folder), max_steps=0)

    class Lines:
        lines: list[str] = []

        def progress(self, message):
            self.lines.append(message)

        def log_metrics(self, metrics, step=None):
            pass

    reporter = Lines()
    train_sharded_under_torchrun(job, hardware=HardwareConfig(device="cpu", nproc=2), work_dir=tmp_path / "work",
                                 out_dir=tmp_path / "out", reporter=reporter, label="H-2")
    save_checkpoint(hybridize(load_model(folder, CPU, "teacher", fp32=True), layers, seed=seed),
                    load_tokenizer(folder), tmp_path / "reference", "float32")
    assert same_files(tmp_path / "reference", tmp_path / "out") == {name: True for name in CHECKPOINT_FILES}

    memory = [json.loads((tmp_path / "work" / "torchrun" / RESULT_DIR / MEMORY_FILE.format(rank=rank)).read_text())
              for rank in range(2)]
    model_bytes = memory[0]["model_bytes"]
    assert model_bytes > 380 * 2**20  # student (fp32) + teacher (fp32): about 200 MB each
    ratios = [entry["peak_bytes"] / model_bytes for entry in memory]
    peaks = ", ".join(f"{entry['peak_bytes'] / 2**20:.0f} MiB" for entry in memory)
    print(f"peak host memory while building, per rank: {peaks} of {model_bytes / 2**20:.0f} MiB "
          f"(ratios {', '.join(f'{ratio:.3f}' for ratio in ratios)})")
    assert all(ratio < MEMORY_BOUND for ratio in ratios), ratios
    assert any("building the models took at most" in line for line in reporter.lines)
