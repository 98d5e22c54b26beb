"""KL-guided layer selection (pipeline/stages/kl.py) on a tiny teacher: its table and plot, a killed scoring
resumed at its missing trials, the step that follows the table; and schedule.selection in the conversion
chain (loo and kl): which stages it calls, which keys it changes, what it refuses."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.chain import run_chain, run_local
from pipeline.config import ConfigError, RunConfig, ScheduleConfig, key_plain
from pipeline.executor import Source
from pipeline.stages import StageError, run_convert, run_kl, run_kl_step, run_loo
from pipeline.stages.common import StageData, load_model, load_tokenizer, resolve_precision
from pipeline.stages.kl import ALL_CONVERTED, KL_FILE, KL_PLOT, TRIALS_FILE, rank_by_fall, trial_loss

from tests.chain.test_cache_keys import ContentRecorder, KeyRecorder, set_field
from tests.stages.conftest import RecordingReporter, tiny_config


@pytest.fixture(scope="module")
def h2(tiny_teacher, tmp_path_factory):
    """H-2 of the tiny teacher (LOO, then the first conversion), as the chain makes it."""
    root = tmp_path_factory.mktemp("kl")
    cfg = tiny_config()
    run_loo(cfg.loo, cfg.data.view("eval", "distill"), cfg.hardware, 2, teacher=tiny_teacher, out_dir=root / "loo",
            work_dir=root / "lw", reporter=RecordingReporter())
    run_convert(cfg.train, cfg.mamba, cfg.data.view("distill"), cfg.hardware, cfg.seed, 2, teacher=tiny_teacher,
                loo=root / "loo", out_dir=root / "H-2", work_dir=root / "cw", reporter=RecordingReporter())
    return root / "H-2"


def score(cfg, teacher, parent, out_dir, work_dir, reporter=None):
    return run_kl(cfg.mmr.train, cfg.data.view("distill"), cfg.hardware, cfg.seed, teacher=teacher, parent=parent,
                  out_dir=out_dir, work_dir=work_dir, reporter=reporter or RecordingReporter())


@pytest.fixture(scope="module")
def scored(tiny_teacher, h2, tmp_path_factory):
    out = tmp_path_factory.mktemp("kl-H-2")
    reporter = RecordingReporter()
    result = score(tiny_config(), tiny_teacher, h2, out / "kl", out / "work", reporter)
    return result, reporter, out / "kl"


def attention_layers(folder) -> list[int]:
    pattern = json.loads((folder / "stage.json").read_text())["layer_pattern"]
    return [index for index, kind in enumerate(pattern) if kind == "A"]


def test_the_table_ranks_every_attention_layer_by_its_kl_fall(tiny_teacher, h2, scored):
    result, reporter, folder = scored
    cfg = tiny_config()
    attention = attention_layers(h2)
    assert len(attention) == 2
    assert json.loads((folder / KL_FILE).read_text()) == result
    assert sorted(entry["layer"] for entry in result["ranking"]) == attention
    assert (result["n_mamba"], result["trials"], result["steps"]) == (2, 3, cfg.mmr.train.steps)
    falls = [entry["kl_fall"] for entry in result["ranking"]]
    assert falls == sorted(falls)  # the smallest fall (least worth keeping as attention) first
    for entry in result["ranking"]:
        assert entry["kl_fall"] == pytest.approx(result["all_converted_loss"] - entry["loss"])
        assert entry["loss"] > 0
    assert result["ranking"] == rank_by_fall(result["all_converted_loss"],
                                             {entry["layer"]: entry["loss"] for entry in result["ranking"]})
    # every trial is a training of its own (its own curves), the reference one converts every attention layer
    assert sorted(reporter.trials) == sorted(["kl-all-converted", *(f"kl-layer-{layer}-kept" for layer in attention)])
    for trial in reporter.trials.values():
        assert {"train/loss", "train/kl"} <= set(trial.metrics[-1][1])
    teacher = load_model(tiny_teacher, cfg.hardware, "teacher")
    parent = load_model(h2, cfg.hardware, "parent", fp32=True)
    data = StageData(cfg.data.view("distill"), load_tokenizer(tiny_teacher))
    again = {name: trial_loss(parent, teacher, data, cfg.data.view("distill"), cfg.mmr.train,
                              resolve_precision(cfg.hardware), cfg.seed, converted, None)
             for name, converted in ((ALL_CONVERTED, attention), ("kept", attention[1:]))}
    assert again[ALL_CONVERTED] == result["all_converted_loss"]  # the reference: every attention layer converted
    kept = next(entry for entry in result["ranking"] if entry["layer"] == attention[0])
    assert again["kept"] == kept["loss"]  # layer attention[0] kept: only the other one converted
    assert (folder / KL_PLOT).stat().st_size > 1000
    meta = json.loads((folder / "stage.json").read_text())
    assert meta["stage"] == "kl" and meta["ranking"] == [entry["layer"] for entry in result["ranking"]]


def test_a_killed_scoring_resumes_at_its_missing_trials(tiny_teacher, h2, scored, tmp_path):
    result, _, _ = scored
    cfg = tiny_config()  # mmr.train: 3 steps a trial, each one a metric
    with pytest.raises(KeyboardInterrupt):  # dies in the second trial, after the first was recorded
        score(cfg, tiny_teacher, h2, tmp_path / "kl", tmp_path / "work", RecordingReporter(fail_at_metric=5))
    assert list(json.loads((tmp_path / "work" / TRIALS_FILE).read_text())) == [ALL_CONVERTED]
    assert not (tmp_path / "kl" / KL_FILE).exists()
    reporter = RecordingReporter()
    resumed = score(cfg, tiny_teacher, h2, tmp_path / "kl", tmp_path / "work", reporter)
    assert any(line.startswith("  kl all converted:") and "(recorded)" in line for line in reporter.lines)
    assert "kl-all-converted" not in reporter.trials and len(reporter.trials) == 2  # only the missing ones ran
    assert resumed == result  # the same scores as the scoring that was never killed


def test_the_step_converts_the_smallest_falls_and_refuses_another_checkpoints_table(tiny_teacher, h2, scored,
                                                                                     tmp_path):
    _, _, folder = scored
    cfg = tiny_config()
    table = json.loads((folder / KL_FILE).read_text())
    flipped = dict(table, ranking=list(reversed(table["ranking"])))  # the other layer first
    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / KL_FILE).write_text(json.dumps(flipped))

    def step(kl, out):
        return run_kl_step(cfg.train, cfg.data.view("distill"), cfg.hardware, cfg.seed, 3, teacher=tiny_teacher,
                           parent=h2, kl=kl, out_dir=tmp_path / out, work_dir=tmp_path / f"{out}-work",
                           reporter=RecordingReporter())

    meta = step(tmp_path / "kl", "H-3")
    assert meta["converted_layers"] == [flipped["ranking"][0]["layer"]]
    assert (meta["stage"], meta["selected_by"], meta["n_mamba"]) == ("kl_step", "kl", 3)
    stale = dict(table, n_mamba=1)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / KL_FILE).write_text(json.dumps(stale))
    with pytest.raises(StageError, match="belongs to another checkpoint"):
        step(tmp_path / "stale", "H-3-stale")


def test_one_attention_layer_left_needs_no_trial(tiny_teacher, h2, scored, tmp_path):
    _, _, folder = scored
    cfg = tiny_config()
    run_kl_step(cfg.train, cfg.data.view("distill"), cfg.hardware, cfg.seed, 3, teacher=tiny_teacher, parent=h2,
                kl=folder, out_dir=tmp_path / "H-3", work_dir=tmp_path / "w", reporter=RecordingReporter())
    reporter = RecordingReporter()
    result = score(cfg, tiny_teacher, tmp_path / "H-3", tmp_path / "kl", tmp_path / "kw", reporter)
    (last,) = attention_layers(tmp_path / "H-3")
    assert result["ranking"] == [{"layer": last, "kl_fall": 0.0, "loss": None}] and result["trials"] == 0
    assert not reporter.trials


# --- schedule.selection in the conversion chain ------------------------------------------------------

class StageRecorder(ContentRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.stages: dict[str, str] = {}

    def __call__(self, call):
        self.stages[call.name] = call.stage
        return super().__call__(call)


def walk(cfg: RunConfig) -> StageRecorder:
    recorder = StageRecorder()
    run_chain(cfg, recorder, None)
    return recorder


def test_selection_chooses_the_stages_of_every_later_step():
    base = RunConfig()
    assert "selection" not in key_plain(ScheduleConfig())  # at its default it is in no key
    mmr = walk(base)
    assert [mmr.stages[name] for name in ("mmr-H-4", "H-5", "mmr-H-5", "H-6")] == ["mmr", "step", "mmr", "step"]
    loo = walk(set_field(base, "schedule.selection", "loo"))
    assert list(loo.stages) == ["teacher", "loo", "H-4", "H-5", "H-6", "H-6-SFT", "evaluate"]
    assert loo.stages["H-5"] == loo.stages["H-6"] == "loo_step"
    assert loo.inputs["H-5"]["loo"].name == "loo" and loo.inputs["H-6"]["parent"].name == "H-5"
    kl = walk(set_field(base, "schedule.selection", "kl"))
    assert list(kl.stages) == ["teacher", "loo", "H-4", "kl-H-4", "H-5", "kl-H-5", "H-6", "H-6-SFT", "evaluate"]
    assert [kl.stages[name] for name in ("kl-H-4", "H-5", "kl-H-5", "H-6")] == ["kl", "kl_step", "kl", "kl_step"]
    assert kl.inputs["H-5"]["kl"].name == "kl-H-4" and kl.inputs["kl-H-5"]["parent"].name == "H-5"
    # the first conversion, LOO and the teacher are the recipe's, whatever the selection
    assert {name: kl.keys[name] for name in ("teacher", "loo", "H-4")} == \
        {name: mmr.keys[name] for name in ("teacher", "loo", "H-4")} == \
        {name: loo.keys[name] for name in ("teacher", "loo", "H-4")}
    first = KeyRecorder()
    run_chain(base, first, None, until="mmr")
    assert list(first.keys)[-1] == "mmr-H-4"
    first_kl = KeyRecorder()
    run_chain(set_field(base, "schedule.selection", "kl"), first_kl, None, until="mmr")
    assert list(first_kl.keys)[-1] == "kl-H-4"


def test_the_kl_scoring_reads_the_mmr_trial_settings_and_the_seed_not_the_distillation():
    cfg = set_field(RunConfig(), "schedule.selection", "kl")
    base = KeyRecorder()
    run_chain(cfg, base, None)

    def differ(path, value):
        new = KeyRecorder()
        run_chain(set_field(cfg, path, value), new, None)
        return {name for name in base.keys if new.keys[name] != base.keys[name]}

    assert differ("mmr.train.steps", 7) == {"kl-H-4", "kl-H-5"}
    assert differ("mmr.seeds", 3) == set()  # MMR's draws per candidate: the KL trials draw once
    assert differ("train.steps", 7) == {"H-4", "H-5", "H-6"}
    assert differ("seed", 5) == {"H-4", "kl-H-4", "H-5", "kl-H-5", "H-6"}


def test_selection_refusals():
    with pytest.raises(ConfigError, match="schedule.selection must be one of mmr, loo, kl"):
        ScheduleConfig(selection="random")
    with pytest.raises(ConfigError, match="needs schedule.selection=mmr"):
        ScheduleConfig(selection="kl", mixers=["mamba", "gdn"])
    start = set_field(set_field(RunConfig(), "start.path", "/models/h"), "schedule.selection", "loo")
    with pytest.raises(ConfigError, match="does not compute: use schedule.selection=mmr or kl"):
        run_chain(start, KeyRecorder(), None, start=Source("/models/h", "h-content", lambda: None, ("config.json",)))
    generic = set_field(set_field(RunConfig(), "data.generic", "teacher"), "data.distill_on", "generic")
    with pytest.raises(ConfigError, match="MMR trials cannot read the teacher's samples"):
        run_chain(generic, KeyRecorder(), None)
    walked = walk(set_field(generic, "schedule.selection", "kl"))  # the KL trials can
    for name in ("H-4", "kl-H-4", "H-5", "kl-H-5", "H-6"):
        assert walked.inputs[name]["generic"].name == "teacher-samples", name


def test_a_kl_selected_chain_runs_and_reruns_from_the_store(tmp_path):
    from flows.config import compose

    cfg = compose(["experiment=tiny", "schedule.selection=kl", f"storage.uri={tmp_path / 'store'}",
                   f"storage.cache_dir={tmp_path / 'cache'}"])
    out = run_local(cfg, until="steps")
    assert list(out) == ["teacher", "loo", "H-2", "kl-H-2", "H-3"]
    assert set(json.loads((out["kl-H-2"] / "run_config.json").read_text())) == {"train", "data", "hardware", "seed"}
    table = json.loads((out["kl-H-2"] / KL_FILE).read_text())
    meta = json.loads((out["H-3"] / "stage.json").read_text())
    assert meta["stage"] == "kl_step" and meta["converted_layers"] == [table["ranking"][0]["layer"]]
    reporter = RecordingReporter()
    run_local(cfg, until="steps", reporter=reporter)
    assert sum("complete in the store, skipped" in line for line in reporter.lines) == 5
    loo = run_local(dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, selection="loo")),
                    until="steps")
    ranking = json.loads((out["loo"] / "loo.json").read_text())["ranking"]
    assert json.loads((loo["H-3"] / "stage.json").read_text())["converted_layers"] == [ranking[2]]


def test_the_flow_publishes_the_kl_table(scored):
    from flows.publish import kl_markdown

    result, _, folder = scored
    lines = kl_markdown(folder, "kl-H-2", "-").splitlines()
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [int(row.split("|")[2]) for row in rows] == [entry["layer"] for entry in result["ranking"]]
    assert f"{result['ranking'][0]['kl_fall']:+.4f}" in rows[0]
