"""The whole run checked before it starts: every bad input of a new user is found by the plan, as one line
naming the culprit, all at once, with nothing written; the plan lists each stage's key and action."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flows.config import compose
from flows.convert import check_run
from tests.flows.helpers import PYTHON, subprocess_env


def overrides(tmp_path: Path, *more: str) -> list[str]:
    """The demo config, its store, cache and SQLite tracking inside tmp_path."""
    return ["experiment=tiny", f"storage.uri={tmp_path / 'artifacts'}", f"storage.cache_dir={tmp_path / 'cache'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *more]


def problems(tmp_path: Path, *more: str) -> list[str]:
    return check_run(compose(overrides(tmp_path, *more))).problems


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory) -> Path:
    """A saved teacher of an unsupported architecture (config.json, weights, tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_a_good_run_has_no_problems_and_a_row_per_stage(tmp_path):
    plan = check_run(compose(overrides(tmp_path)))
    assert plan.problems == []
    assert [(row.stage, row.name) for row in plan.rows] == [
        ("teacher", "teacher"), ("loo", "loo"), ("convert", "H-2"), ("mmr", "mmr-H-2"), ("step", "H-3"),
        ("sft", "H-3-SFT"), ("evaluate", "evaluate")]
    assert plan.rows[0].status == "run" and len(plan.rows[0].key) == 64
    assert all(row.key is None and row.status == "run" for row in plan.rows[1:])  # after outputs not made yet
    assert list(tmp_path.iterdir()) == []  # nothing written: no store, no cache, no MLflow database


@pytest.mark.parametrize(("override", "culprit"), [
    ("schedule.counts=[2,999]", "schedule.counts [2, 999] exceeds the teacher's 4 layers"),
    ("sft.checkpoint=H-9", "sft.checkpoint='H-9' is not a checkpoint of schedule.counts [2, 3]"),
    ("mamba.d_state=7", "mamba settings do not fit the teacher"),
    ("data.sft=/nonexistent/sft", "data.sft=/nonexistent/sft: no such file or folder"),
    ("hardware.device=cuda", "hardware.device=cuda but no CUDA device is available"),
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri: MLflow server http://127.0.0.1:9 cannot be reached"),
    ("tracking.uri=sqlite:////nonexistent/dir/mlflow.db", "the folder /nonexistent/dir does not exist"),
    ("storage.uri={tmp}/a-file/runs", "storage.uri: {tmp}/a-file/runs/tiny cannot be written"),
    ("evaluate.max_new_tokens=8", "evaluate.max_new_tokens=8 is shorter than the reference replies of 8 of the 8"),
    ("loo.metric=accuracy loo.max_new_tokens=20", "loo.max_new_tokens=20 is shorter than the reference replies"),
])
def test_each_bad_input_is_one_line_naming_it(tmp_path, override, culprit):
    (tmp_path / "a-file").write_text("not a folder")
    override, culprit = override.format(tmp=tmp_path), culprit.format(tmp=tmp_path)
    if override.startswith("hardware.device=cuda"):
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    found = problems(tmp_path, *override.split())
    assert len(found) == 1 and culprit in found[0], found
    assert "\n" not in found[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]  # nothing written


def test_teacher_problems_come_from_its_config_json_without_loading_weights(tmp_path, gpt2_teacher):
    found = problems(tmp_path, "teacher=local", f"teacher.path={gpt2_teacher}")
    assert found == [f"teacher.path={gpt2_teacher} is a GPT2LMHeadModel: unsupported teacher architecture; "
                     "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, HybridForCausalLM"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems(tmp_path, "teacher=local", f"teacher.path={empty}") == [
        f"teacher.path={empty} has no config.json: it must be a saved transformers checkpoint"]
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 32,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 104}
    (weightless / "config.json").write_text(json.dumps(config))
    (weightless / "tokenizer.json").write_text("{}")
    assert problems(tmp_path, "teacher=local", f"teacher.path={weightless}", "schedule.counts=[2,5]") == [
        f"teacher.path={weightless} has no weights (none of model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json)",
        "schedule.counts [2, 5] exceeds the teacher's 4 layers"]


def test_data_without_the_columns_a_stage_needs(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "test.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    only_train = tmp_path / "sft"
    only_train.mkdir()
    (only_train / "validation.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    found = problems(tmp_path, f"data.eval={folder}", f"data.sft={only_train}")
    assert found == [f"data.sft={only_train}: no train* files (found splits: validation)",
                     f"data.eval: rows of {folder / 'test.jsonl'} lack ['answer'] (found ['messages'])"]


def test_missing_mamba_kernels_on_cuda(monkeypatch):
    import torch

    from pipeline.config import RunConfig
    from pipeline.model import kernels
    from pipeline.plan import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_mamba_ssm", lambda: (None, "mamba_ssm unavailable (ImportError: no module)"))
    monkeypatch.setattr(kernels, "_causal_conv1d", lambda: ((None, None), ""))
    monkeypatch.delenv("HYBRID_KERNELS", raising=False)
    found, notes = [], []
    check_device(RunConfig(), found, notes)
    assert len(found) == 1 and "without the Mamba kernels (mamba_ssm unavailable" in found[0]
    assert "HYBRID_KERNELS=reference" in found[0]
    monkeypatch.setenv("HYBRID_KERNELS", "reference")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "test GPU")
    found = []
    check_device(RunConfig(), found, notes)
    assert found == []


def test_cli_prints_every_problem_on_its_own_line_and_writes_nothing(tmp_path):
    args = [PYTHON, "-m", "flows.convert", *overrides(tmp_path, "schedule.counts=[2,999]", "sft.checkpoint=H-9",
                                                     "data.sft=/nonexistent/sft")]
    result = subprocess.run(args, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: schedule.counts [2, 999] exceeds the teacher's 4 layers",
                     "error: data.sft=/nonexistent/sft: no such file or folder",
                     "error: sft.checkpoint='H-9' is not a checkpoint of schedule.counts [2, 999]: choose one of "
                     "last, H-2, H-999"], result.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_plan_prints_the_stages_and_runs_nothing(tmp_path):
    result = subprocess.run([PYTHON, "-m", "flows.convert", "--plan", *overrides(tmp_path)], cwd=tmp_path,
                            env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].split() == ["stage", "output", "key", "action", "inputs"]
    assert [line.split()[1] for line in out[1:8]] == ["teacher", "loo", "H-2", "mmr-H-2", "H-3", "H-3-SFT",
                                                     "evaluate"]
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()


def test_precision_is_resolved_and_bf16_mixed_needs_a_bf16_cuda_device(monkeypatch):
    import dataclasses

    import torch

    from pipeline.config import HardwareConfig, RunConfig
    from pipeline.plan import check_precision

    def checked(**hardware):
        found, notes = [], []
        check_precision(dataclasses.replace(RunConfig(), hardware=HardwareConfig(**hardware)), found, notes)
        return found, notes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checked() == ([], ["precision: fp32"])  # auto on the CPU
    found, notes = checked(device="cpu", precision="bf16-mixed")  # allowed: CPU autocast, fp32 masters
    assert found == [] and notes[0].startswith("precision: bf16-mixed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    found, _ = checked()  # auto on CUDA = bf16-mixed
    assert found == ["hardware.precision=auto needs bf16, which this CUDA device (old GPU) lacks: "
                     "set hardware.precision=fp32"]
    assert checked(precision="fp32") == ([], ["precision: fp32"])
    assert checked(device="cpu") == ([], ["precision: fp32"])


def test_a_start_checkpoint_through_the_flow_config_and_its_plan(tmp_path):
    """`start=hybrid start.path=...` composes, resolves like teacher.path and puts the start stage in the plan
    (the demo teacher: the start is a hybrid of a model of its shape, exported in the MambaInLlama layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.convert import hybridize
    from pipeline.data import build_char_tokenizer
    from pipeline.export import export

    tokenizer = build_char_tokenizer()
    demo = compose(overrides(tmp_path)).teacher.demo
    teacher = LlamaForCausalLM(LlamaConfig(**demo.llama_config_kwargs(len(tokenizer))))
    hybrid = tmp_path / "models" / "ours"
    hybridize(teacher, [1], dt_rank=2).save_pretrained(hybrid)
    tokenizer.save_pretrained(hybrid)
    export(hybrid, tmp_path / "models" / "mil-h1", "mambainllama")
    plan = check_run(compose(overrides(tmp_path, "start=hybrid", f"start.path={tmp_path / 'models' / 'mil-h1'}")))
    assert plan.problems == []
    assert [row.name for row in plan.rows] == ["teacher", "start", "mmr-start", "H-2", "mmr-H-2", "H-3", "H-3-SFT",
                                               "evaluate"]
    unreachable = problems(tmp_path, "start=hybrid", "start.path=s3://no-such-bucket-4f2a/h30",
                           "storage.endpoint_url=http://127.0.0.1:9")
    assert unreachable[0].startswith("start.path=s3://no-such-bucket-4f2a/h30: ")
