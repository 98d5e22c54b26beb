"""Every shipped config option composes into a valid RunConfig; bad overrides fail in one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import CONF_DIR, GROUPS, ConfigCompositionError, compose, group_options
from pipeline.config import RunConfig, to_plain

REPO = Path(__file__).resolve().parents[2]
TEACHER = ["teacher.path=/models/teacher"]
DATA = ["data.distill=/data/traces.jsonl", "data.sft=/data/sft.jsonl", "data.eval=/data/test.jsonl"]
# Options that need the user's values; composing them without these must fail (tested below).
REQUIRED = {
    ("teacher", "local"): TEACHER,
    ("start", "hybrid"): ["start.path=/models/apriel-h1-h30"],
    ("data", "local"): DATA,
    ("experiment", "apriel_15b"): TEACHER + DATA,
}
OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_ships_options():
    assert set(GROUPS) == {path.name for path in CONF_DIR.iterdir() if path.is_dir()}
    for group in GROUPS:
        assert group == "experiment" or "default" in group_options(group), group
    assert {"tiny", "apriel_15b"} <= set(group_options("experiment"))
    assert len(OPTIONS) >= 30


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(("group", "option"), list(REQUIRED), ids=[f"{g}={o}" for g, o in REQUIRED])
def test_options_needing_user_values_say_which(group, option):
    with pytest.raises(ConfigCompositionError,
                       match=r"missing required value (teacher\.path|start\.path|data\.distill)"):
        compose([f"{group}={option}"])


def test_defaults_are_the_schema_defaults():
    """The `default` options restate nothing: the dataclasses stay the single source of the numbers.
    (Compared as plain values: OmegaConf hands tuples back as lists.)"""
    assert to_plain(compose([])) == to_plain(RunConfig())


def test_group_aliases():
    assert compose(["teacher=default"]) == compose(["teacher=demo"])
    assert compose(["start=default"]) == compose(["start=teacher"])
    assert compose(["storage=default"]) == compose(["storage=local"])
    assert compose(["tracking=default"]) == compose(["tracking=sqlite"])
    assert compose(["hardware=default"]) == compose(["hardware=auto"])


def test_apriel_preset_holds_the_recipe():
    cfg = compose(["experiment=apriel_15b", *TEACHER, *DATA])
    assert cfg.schedule.counts == [25, 27, 30, 34, 37, 40]
    assert (cfg.train.loss, cfg.train.temperature, cfg.train.trainable) == ("reverse_kl", 1.0, "all")
    assert (cfg.mamba.d_state, cfg.mamba.dt_rank) == (16, 16)
    assert cfg.mmr.train.steps == 100 and cfg.mmr.train.trainable == "mamba"
    assert cfg.sft.checkpoint == "H-30"
    assert (cfg.hardware.device, cfg.hardware.precision) == ("cuda", "bf16-mixed")
    assert cfg.train.save_dtype == cfg.sft.train.save_dtype == "bfloat16"  # fp32 masters, bf16 checkpoints
    assert cfg.teacher.path == "/models/teacher"
    cfg.schedule.validate(50)


def test_gpu_demo_preset_trains_its_teacher_with_teacher_demo_train_in_bf16_mixed():
    cfg = compose(["experiment=gpu_demo"])
    assert (cfg.hardware.device, cfg.hardware.precision) == ("cuda", "bf16-mixed")
    demo = cfg.teacher.demo
    assert (demo.hidden_size, demo.num_hidden_layers) == (512, 8)
    assert (demo.train.steps, demo.train.lr, demo.train.batch_size, demo.train.max_length) == (2000, 7e-4, 128, 128)
    assert (cfg.mmr.train.steps, cfg.mmr.train.batch_size, cfg.mmr.train.max_length) == (100, 32, 128)
    assert cfg.sft.train.steps == 200 and cfg.data.max_length == 128
    cfg.schedule.validate(demo.num_hidden_layers)


def test_tiny_preset_is_tiny():
    cfg = compose(["experiment=tiny"])
    assert (cfg.hardware.device, cfg.hardware.precision) == ("cpu", "fp32")
    assert cfg.teacher.demo.num_hidden_layers == 4 and cfg.teacher.demo.train.steps <= 10
    assert cfg.train.steps <= 10 and cfg.mmr.train.steps <= 5 and cfg.sft.train.steps <= 5
    cfg.schedule.validate(cfg.teacher.demo.num_hidden_layers)


def test_stable_override_keys():
    assert compose(["start=hybrid", "start.path=s3://models/apriel-h30"]).start.path == "s3://models/apriel-h30"
    assert compose([]).start.path is None
    cfg = compose(["teacher.path=s3://models/llama", "schedule.counts=[3,5]", "storage.uri=s3://bucket/runs",
                   "tracking.uri=http://127.0.0.1:5000", "run_name=my-run", "teacher.demo.train.steps=200"])
    assert cfg.teacher.path == "s3://models/llama"
    assert cfg.schedule.counts == [3, 5]
    assert cfg.storage.uri == "s3://bucket/runs"
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.run_name == "my-run"
    assert cfg.teacher.demo.train.steps == 200  # the demo teacher's TrainConfig, overridable like any other


def test_lm_eval_section():
    assert compose([]).evaluate.lm_eval.tasks == []  # off by default: make pipeline needs no lm-eval
    cfg = compose(["evaluate.lm_eval.tasks=[arc_easy,hellaswag]", "evaluate.lm_eval.limit=50",
                   "evaluate.lm_eval.apply_chat_template=true"])
    assert cfg.evaluate.lm_eval.tasks == ["arc_easy", "hellaswag"] and cfg.evaluate.lm_eval.limit == 50
    assert cfg.evaluate.lm_eval.apply_chat_template is True
    with pytest.raises(ConfigCompositionError, match="evaluate.lm_eval.num_fewshot must be >= 0"):
        compose(["evaluate.lm_eval.num_fewshot=-1"])


@pytest.mark.parametrize("group", GROUPS)
def test_bad_group_option_lists_the_choices(group):
    with pytest.raises(ConfigCompositionError) as caught:
        compose([f"{group}=no_such_option"])
    message = str(caught.value)
    assert "\n" not in message
    assert f"{group}/no_such_option" in message
    assert f"valid choices for {group}: {', '.join(group_options(group))}" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=0.1", "did you mean train.lr?"),
        ("teachr.path=/x", "did you mean teacher?"),
        ("schedule.count=[1,2]", "did you mean schedule.counts?"),
        ("train.steps=many", "could not be converted to Integer"),
        ("schedule.counts=[3,2]", "schedule.counts must be strictly increasing"),
        ("schedule.first_steps=0", "schedule.first_steps must be an int >= 1 or null, got 0"),
        ("schedule.first_steps=5", "schedule.first_steps=5 does not fit train: train.warmup_steps must be an int in [0, steps=5], got 10"),
        ("hardware.device=tpu", "hardware.device must be one of"),
        ("hardware.nproc=0", "hardware.nproc must be an int >= 1"),
        ("mmr.seeds=0", "mmr.seeds must be an int >= 1 (initialisations per candidate), got 0"),
        ("hardware.nnodes=2", "hardware.nnodes=2 needs hardware.rdzv_endpoint"),
        ("run_name=a/b", "run_name must be one name of letters, digits, '.', '_' or '-'"),
        ("run_name=..", "run_name must be one name of letters"),  # it made the run's root a user's folder
        ("run_name=" + "x" * 101, "at most 100 characters"),
        ("hardware.threads=0", "hardware.threads must be an int >= 1 or null, got 0"),
        ("hardware.rdzv_endpoint=nohost", "hardware.rdzv_endpoint must be host:port"),
        ("loo.num_examples=0", "loo.num_examples must be an int >= 1, got 0"),
        ("loo.batch_size=-1", "loo.batch_size must be an int >= 1"),
        ("loo.max_new_tokens=0", "loo.max_new_tokens must be an int >= 1"),
        ("evaluate.batch_size=0", "evaluate.batch_size must be an int >= 1"),
        ("evaluate.throughput_repeats=0", "evaluate.throughput_repeats must be an int >= 1"),
        ("data.max_length=1", "data.max_length must be an int >= 2"),
        ("seed=-1", "seed must be an int in [0, 4294967295]"),
        ("storage.endpoint_url=minio:9000", "storage.endpoint_url must be an http(s):// URL"),
        ("storage.retain_hours=-1", "storage.retain_hours must be a number of hours >= 0"),
        ("tracking.experiment=''", "tracking.experiment must be a non-empty name"),
        ("teacher.demo.num_attention_heads=3", "hidden_size 128 must be a multiple of num_attention_heads 3"),
        ("sft.checkpoint=../H-3", "sft.checkpoint must be 'last' or a checkpoint name"),
    ],
)
def test_bad_override_is_one_clear_line(override, expected):
    with pytest.raises(ConfigCompositionError) as caught:
        compose([override])
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_prints_one_line_for_a_bad_option(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "flows.convert", "teacher=nope"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: In 'config': Could not find 'teacher/nope'; valid choices for teacher: "
                     f"{', '.join(group_options('teacher'))}"], result.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing started


def test_pretrained_options_are_the_python_settings():
    """conf/{train,mmr,sft}/pretrained.yaml and teacher=local restate pipeline.config's pretrained settings."""
    composed = compose(["teacher=local", *TEACHER])
    expected = RunConfig().with_pretrained_settings()
    assert to_plain(composed.train) == to_plain(expected.train)
    assert to_plain(composed.mmr) == to_plain(expected.mmr)
    assert to_plain(composed.sft) == to_plain(expected.sft)
    assert composed.data.max_length == expected.data.max_length
    assert composed.uses_demo_settings() == []
    assert RunConfig().uses_demo_settings() == ["train", "mmr.train", "sft.train"]


def test_teacher_path_alone_selects_pretrained_settings():
    """`teacher.path=...` without `teacher=` is `teacher=local teacher.path=...`: a user's teacher never gets
    the demo's lr 2e-3 by default; an explicit teacher group choice is kept."""
    alone = compose(TEACHER)
    assert to_plain(alone) == to_plain(compose(["teacher=local", *TEACHER]))
    assert alone.train.lr != RunConfig().train.lr
    assert compose(["teacher=demo", *TEACHER]).train.lr == RunConfig().train.lr  # kept: the plan refuses it
    assert compose(["teacher.path=null"]).train.lr == RunConfig().train.lr


def test_an_experiment_sets_its_own_settings_over_teacher_local():
    cfg = compose(["experiment=smollm2"])
    assert cfg.teacher.path and cfg.teacher.finetune.enabled
    assert cfg.train.lr == 1e-4 and cfg.mmr.train.lr == 3e-4 and cfg.data.generic == "teacher"
    assert cfg.schedule.counts == [15, 18, 21, 24] and cfg.sft.checkpoint == "H-18"
    smoke = compose(["experiment=smollm2_smoke"])
    assert smoke.hardware.device == "cpu" and smoke.teacher.path == cfg.teacher.path


def test_teacher_finetune_needs_a_user_teacher():
    with pytest.raises(ConfigCompositionError, match="teacher.finetune.enabled fine-tunes a teacher you give"):
        compose(["teacher.finetune.enabled=true"])
