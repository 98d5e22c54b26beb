"""Cache keys come from exactly what each stage reads: every config field is changed in turn and the
keys that change are the stages that read it, and only those (inputs held fixed, so this is each
stage's own key; a changed output then changes later keys through its content digest)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from pipeline.chain import run_chain
from pipeline.config import RunConfig, ScheduleConfig, to_plain
from pipeline.executor import Output, Source, StageCall, cache_key

CHECKPOINTS = ["H-4", "H-5", "H-6"]
DISTILLATIONS = {"H-4", "mmr-H-4", "H-5", "mmr-H-5", "H-6"}
ALL = {"teacher", "loo", *DISTILLATIONS, "H-6-SFT", "evaluate"}
USER_TEACHER = Source("/models/teacher", "teacher-content", lambda: None, ("config.json",), None)

# Which outputs read a field (longest matching prefix wins), for the demo teacher and for a user's teacher.
READERS = {
    "run_name": set(),  # where outputs go, not what they are
    "storage": set(),
    "tracking": set(),
    "ablation": set(),  # the ablation flow's (flows/ablation.py), not the conversion chain's
    "hardware.threads": set(),  # speed only
    "hardware.nproc": set(),  # the same global batches on any process count: float rounding only
    "hardware.nnodes": set(),
    "hardware.rdzv_endpoint": set(),
    "train.activation_checkpointing": set(),  # memory for compute, the same trajectory
    "mmr.train.activation_checkpointing": set(),
    "sft.train.activation_checkpointing": set(),
    "teacher.demo.train.activation_checkpointing": set(),
    "train.cpu_offload": set(),  # where FSDP keeps the shards and steps AdamW: float rounding only
    "mmr.train.cpu_offload": set(),
    "sft.train.cpu_offload": set(),
    "teacher.demo.train.cpu_offload": set(),
    "train.save_sharded": set(),  # how the trained weights leave the ranks: the same checkpoint files
    "mmr.train.save_sharded": set(),
    "sft.train.save_sharded": set(),
    "teacher.demo.train.save_sharded": set(),
    "hardware": ALL,
    "seed": {"H-4", "mmr-H-4", "H-5", "mmr-H-5", "H-6"},  # MIL initialisation of the fresh Mamba parameters
    "teacher.demo": {"teacher"},
    # the teacher fine-tuned first: a new teacher-ft output that every stage after the teacher reads instead
    "teacher.finetune.enabled": ALL - {"teacher", "H-6-SFT"},  # (SFT reads only its checkpoint)
    "teacher.finetune.train": set(),  # read only by that fine-tuning
    "data.samples": set(),  # read only with data.generic=teacher (test_generic_samples_enter_only_their_readers)
    "data.max_length": ALL,
    "data.demo": ALL,
    "data.demo.n_text": {"evaluate"},  # the generic corpus: the evaluation's generic NLL (and a mixing teacher)
    "data.demo.min_sentences": {"evaluate"},
    "data.demo.max_sentences": {"evaluate"},
    "data.distill": {"teacher", "loo", *DISTILLATIONS},  # LOO: its validation split, or a held-out share
    "data.validation_share": set(),  # only for a user's data.distill without validation files
    "data.sft": {"H-6-SFT"},
    "data.eval": {"loo", "evaluate"},
    "data.generic": {"evaluate"},
    "data.distill_on": DISTILLATIONS,
    "mamba": {"H-4"},  # later steps take their parent's mixer settings
    "gdn": set(),  # read only where schedule.mixers lists "gdn" (test_mixers_enter_only_the_keys_that_read_them)
    "schedule.mixers": {"mmr-H-4", "H-5", "mmr-H-5", "H-6"},  # [mamba, gdn]: the first conversion is still Mamba
    # loo: no MMR scorings, the steps by loo_step (tests/stages/test_kl_selection.py has kl)
    "schedule.selection": {"mmr-H-4", "H-5", "mmr-H-5", "H-6"},
    "schedule.first_steps": {"H-4"},  # the first distillation's length: the steps after it keep theirs
    "loo": {"loo"},
    "train": {"H-4", "H-5", "H-6"},
    "mmr": {"mmr-H-4", "mmr-H-5"},
    "mmr.seeds": {"mmr-H-4", "mmr-H-5"},  # initialisations a candidate: the MMR scorings only, with any mixers
    "sft.train": {"H-6-SFT"},
    "evaluate": {"evaluate"},
}
USER_READERS = {**READERS, "teacher.demo": set(), "hardware": ALL}  # import_teacher reads only hardware
for prefix in ("data.max_length", "data.demo", "data.distill"):
    USER_READERS[prefix] = READERS[prefix] - {"teacher"}

CHOICES = {"loss": ["reverse_kl", "forward_kl"], "trainable": ["all", "mamba"], "mode": ["mixer", "block"],
           "metric": ["accuracy", "nll"], "gqa_expansion": ["chunk", "head_aligned"], "device": ["auto", "cpu"],
           "precision": ["auto", "fp32"], "save_dtype": ["float32", "bfloat16"], "distill_on": ["distill", "generic", "mix"],
           "mixers": [["mamba"], ["mamba", "gdn"]], "selection": ["mmr", "loo", "kl"]}


class KeyRecorder:
    """An executor that runs nothing: records each call's key; every output has a fixed content digest."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}

    def __call__(self, call: StageCall) -> Output:
        self.keys[call.name] = cache_key(call)
        return Output(call.name, call.stage, f"mem://{call.name}", f"content-of-{call.name}", "", "")


def keys(cfg: RunConfig, teacher: Source | None = None) -> dict[str, str]:
    recorder = KeyRecorder()
    run_chain(cfg, recorder, teacher)
    return recorder.keys


def leaves(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [path for key, item in value.items() for path in leaves(item, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def changed(path: str, value: Any) -> Any:
    name = path.rsplit(".", 1)[-1]
    if name in CHOICES:
        return next(choice for choice in CHOICES[name] if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if name not in ("warmup_steps",) else max(value - 1, 0)
    if isinstance(value, float):
        return value / 2 if value else 0.25
    if isinstance(value, (tuple, list)):
        if not value or isinstance(value[0], str):  # a list of names (e.g. lm-eval tasks): one more
            return type(value)([*value, "other"])
        return type(value)(item / 2 for item in value)
    if value is None:
        if name == "first_steps":
            return 400
        return "/data/x" if path.startswith("data.") else 3 if name == "threads" else "http://x:5000"
    return value + "-other"


def set_field(cfg: RunConfig, path: str, value: Any) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    *parents, name = path.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    object.__setattr__(node, name, value)
    return cfg


def readers(table: dict[str, set[str]], path: str) -> set[str]:
    matches = [prefix for prefix in table if path == prefix or path.startswith(prefix + ".")
               or (path.startswith(prefix) and prefix.endswith(("n_text", "sentences")))]
    return table[max(matches, key=len)] if matches else None


BASE = RunConfig()
FIELDS = [path for path in leaves(to_plain(BASE))
          if path not in ("schedule.counts", "sft.checkpoint", "teacher.path", "start.path")]


@pytest.mark.parametrize("user_teacher", [False, True], ids=["demo-teacher", "user-teacher"])
def test_each_field_changes_the_keys_of_the_stages_that_read_it_and_only_those(user_teacher):
    base_cfg = set_field(BASE, "teacher.path", "/models/teacher") if user_teacher else BASE
    teacher = USER_TEACHER if user_teacher else None
    table = USER_READERS if user_teacher else READERS
    base = keys(base_cfg, teacher)
    assert set(base) == ALL
    wrong = []
    for path in FIELDS:
        expected = readers(table, path)
        assert expected is not None, f"no entry in READERS for {path}: say which stages read it"
        value = changed(path, eval(f"base_cfg.{path}"))  # noqa: S307 (a dotted path of our own config)
        new = keys(set_field(base_cfg, path, value), teacher)
        differ = {name for name in ALL if new.get(name) != base[name]}
        if differ != expected:
            wrong.append(f"{path}: changed {sorted(differ)}, expected {sorted(expected)}")
    assert not wrong, "\n".join(wrong)


def test_schedule_sft_choice_and_teacher_content():
    base = keys(BASE)
    longer = keys(set_field(BASE, "schedule.counts", [4, 5, 7]))
    assert {name for name in longer if longer[name] != base.get(name)} == {"H-7", "H-7-SFT", "evaluate"}
    assert {name for name in longer if longer[name] == base.get(name)} == {"teacher", "loo", "H-4", "mmr-H-4", "H-5",
                                                                           "mmr-H-5"}
    first = keys(set_field(BASE, "schedule.counts", [3, 5, 6]))
    assert first["loo"] != base["loo"]  # LOO marks the first conversion's layers in its plot
    assert first["teacher"] == base["teacher"]
    earlier = keys(set_field(BASE, "sft.checkpoint", "H-5"))
    assert "H-5-SFT" in earlier and earlier["evaluate"] != base["evaluate"]
    cfg = set_field(BASE, "teacher.path", "/models/teacher")
    same_uri_new_content = dataclasses.replace(USER_TEACHER, digest="updated-weights")
    assert keys(cfg, same_uri_new_content)["teacher"] != keys(cfg, USER_TEACHER)["teacher"]


def test_code_version_enters_the_key(monkeypatch):
    from pipeline.stages import run_loo

    base = keys(BASE)
    monkeypatch.setattr(run_loo, "code_version", run_loo.code_version + 1)
    bumped = keys(BASE)
    assert {name for name in base if bumped[name] != base[name]} == {"loo"}


class ContentRecorder(KeyRecorder):
    """Like KeyRecorder, with each output's content digest following its key (a changed input makes a
    changed output), so a change reaches every later key as it does in a real run."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, dict] = {}

    def __call__(self, call: StageCall) -> Output:
        key = cache_key(call)
        self.keys[call.name], self.inputs[call.name] = key, call.inputs
        return Output(call.name, call.stage, f"mem://{call.name}", f"content-{key}", "", key)


def test_the_start_checkpoint_is_an_input_of_every_stage_after_it():
    start = Source("/models/apriel-h2", "start-content", lambda: None, ("config.json",), None)
    cfg = set_field(set_field(BASE, "start.path", "/models/apriel-h2"), "schedule.counts", [5, 6])
    recorder = ContentRecorder()
    run_chain(cfg, recorder, None, start=start)
    assert list(recorder.keys) == ["teacher", "start", "mmr-start", "H-5", "mmr-H-5", "H-6", "H-6-SFT", "evaluate"]
    assert recorder.inputs["start"]["source"] is start  # its content digest is the start stage's input
    assert recorder.inputs["mmr-start"]["parent"].name == recorder.inputs["H-5"]["parent"].name == "start"
    assert list(recorder.inputs["evaluate"]["checkpoints"]) == ["start", "H-5", "H-6", "H-6-SFT"]

    changed_start = ContentRecorder()
    run_chain(cfg, changed_start, None, start=dataclasses.replace(start, digest="other-weights"))
    differ = {name for name in recorder.keys if changed_start.keys[name] != recorder.keys[name]}
    assert differ == set(recorder.keys) - {"teacher"}  # every stage that reads it, through the start's content

    no_start = ContentRecorder()
    run_chain(set_field(cfg, "start.path", None), no_start, None)
    assert "loo" in no_start.keys and "start" not in no_start.keys
    assert no_start.keys["teacher"] == recorder.keys["teacher"]


def test_mixers_enter_only_the_keys_that_read_them():
    """The default schedule.mixers [mamba] adds nothing to any key (above: Mamba-only keys as they always were);
    otherwise the first conversion reads the first mixer, MMR every mixer, and the gdn section reaches the
    stages that can create Gated DeltaNet layers."""
    base = keys(BASE)
    only_gdn = set_field(BASE, "schedule.mixers", ["gdn"])
    both = set_field(BASE, "schedule.mixers", ["mamba", "gdn"])
    differ = lambda new: {name for name in ALL if new[name] != base[name]}  # noqa: E731
    assert differ(keys(only_gdn)) == {"H-4", "mmr-H-4", "H-5", "mmr-H-5", "H-6"}
    assert differ(keys(both)) == {"mmr-H-4", "H-5", "mmr-H-5", "H-6"}
    for cfg, readers_of_gdn in ((only_gdn, {"H-4", "mmr-H-4", "H-5", "mmr-H-5", "H-6"}),
                                (both, {"mmr-H-4", "H-5", "mmr-H-5", "H-6"})):
        before, after = keys(cfg), keys(set_field(cfg, "gdn.d_conv", 3))
        assert {name for name in ALL if after[name] != before[name]} == readers_of_gdn


def test_first_steps_is_the_first_conversions_length_and_nothing_else():
    """schedule.first_steps gives the first distillation its own length: its key is the key of a run whose
    train.steps were that many (the same computation), and the later steps keep the keys of train.steps."""
    base = keys(BASE)
    longer = keys(set_field(BASE, "schedule.first_steps", 2 * BASE.train.steps))
    all_longer = keys(set_field(BASE, "train", dataclasses.replace(BASE.train, steps=2 * BASE.train.steps)))
    assert longer["H-4"] == all_longer["H-4"] != base["H-4"]
    assert keys(set_field(BASE, "schedule.first_steps", BASE.train.steps))["H-4"] == base["H-4"]
    assert RunConfig(schedule=ScheduleConfig(first_steps=400)).first_train().steps == 400
    default = RunConfig()
    assert default.first_train() is default.train


def test_generic_samples_enter_only_their_readers():
    """data.generic=teacher adds the samples stage after the teacher; its settings reach it and, through its
    output, the evaluation; nothing else."""
    cfg = set_field(BASE, "data.generic", "teacher")
    recorder = ContentRecorder()
    run_chain(cfg, recorder, None)
    assert list(recorder.keys)[:3] == ["teacher", "teacher-samples", "loo"]
    assert recorder.inputs["evaluate"]["generic"].name == "teacher-samples"
    more = ContentRecorder()
    run_chain(set_field(cfg, "data.samples.test", 7), more, None)
    assert {name for name in recorder.keys if more.keys[name] != recorder.keys[name]} == {"teacher-samples", "evaluate"}
