"""The ablation flow's wiring on the tiny preset (one seed), through a real Prefect API and a real `mlflow
server`: every arm scored, shared prefixes computed once, the report's schema, MLflow's parent and arm
runs, and a rerun that computes nothing and writes the same report. Its findings mean nothing at this size."""

from __future__ import annotations

import functools
import json

import pytest

import pipeline.stages
from flows.ablation import ablation, check_ablation
from flows.config import compose
from pipeline.ablation import ARMS, RECORD_FIELDS, compare, device_tag, summarize
from pipeline.store import open_store

pytestmark = pytest.mark.slow

STAGE_FUNCTIONS = ("run_teacher", "run_loo", "run_convert", "run_mmr", "run_step", "run_loo_step", "run_kl",
                   "run_kl_step", "run_quality")
# one seed, schedule.counts=[2, 3]: five first conversions, one MMR scoring and step, one LOO-ordered step, one
# KL-guided scoring and step, nine scorings (the teacher and the eight arms' final checkpoints)
EXPECTED_CALLS = {"run_teacher": 1, "run_loo": 1, "run_convert": 5, "run_mmr": 1, "run_step": 1, "run_loo_step": 1,
                  "run_kl": 1, "run_kl_step": 1, "run_quality": 9}
FIRSTS = ("reasoning-rkl", "generic-rkl", "mix-rkl", "reasoning-fkl", "reasoning-rkl-ce")
ORDERINGS = ("reasoning-rkl-mmr", "reasoning-rkl-loo", "reasoning-rkl-kl")


def count_stages(monkeypatch) -> dict[str, int]:
    """Counts the calls of each stage function (the ablation looks them up at call time; the wrapper keeps
    the stage's name and code version, so its cache keys are the same)."""
    calls = dict.fromkeys(STAGE_FUNCTIONS, 0)
    for name in STAGE_FUNCTIONS:
        original = getattr(pipeline.stages, name)

        @functools.wraps(original)
        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(pipeline.stages, name, counted)
    return calls


def test_ablation_flow_runs_every_arm_once_and_reruns_from_the_store(
        prefect_api, mlflow_tracking_uri, mlflow_experiment, tmp_path, monkeypatch):
    import mlflow

    results = tmp_path / "results"
    overrides = ["experiment=tiny", "run_name=abl", "ablation.seeds=[0]", f"storage.uri={tmp_path / 'store'}",
                 f"storage.cache_dir={tmp_path / 'cache'}", f"tracking.uri={mlflow_tracking_uri}",
                 f"tracking.experiment={mlflow_experiment}", f"ablation.results_dir={results}"]
    calls = count_stages(monkeypatch)
    first = ablation(overrides=overrides)
    assert calls == EXPECTED_CALLS  # nothing computed twice: the continued arms reuse the recipe arm's H-2

    report = json.loads((results / "ablation-cpu.json").read_text())
    records = report["records"]
    assert {record["arm"] for record in records} == {arm.name for arm in ARMS}
    assert len(records) == len(ARMS)
    for record in records:
        assert set(RECORD_FIELDS) <= set(record), record
        assert record["seed"] == 0 and record["tokens"] > 0
        assert 0.0 <= record["answer_accuracy"] <= 1.0 and record["kl_to_teacher"] > 0.0
    by_arm = {record["arm"]: record for record in records}
    assert [by_arm[name]["n_mamba"] for name in FIRSTS] == [2] * len(FIRSTS)
    assert [by_arm[name]["n_mamba"] for name in ORDERINGS] == [3] * len(ORDERINGS)
    assert (by_arm["generic-rkl"]["data"], by_arm["mix-rkl"]["data"], by_arm["reasoning-fkl"]["loss"],
            by_arm["reasoning-rkl-ce"]["loss"], by_arm["reasoning-rkl-kl"]["ordering"]) == \
        ("generic", "mix", "forward_kl", "reverse_kl+ce", "kl")
    assert by_arm["reasoning-rkl-mmr"]["mmr_scoring_sequences"] > 0
    # the KL-guided scoring: one trial more than MMR's (the all-converted reference), the same trial settings
    assert by_arm["reasoning-rkl-kl"]["kl_scoring_sequences"] == by_arm["reasoning-rkl-mmr"]["mmr_scoring_sequences"] * 3 // 2
    # the orderings continue the recipe arm's H-2 of the same seed, and count its tokens
    store = open_store(str(tmp_path / "store" / "abl"))
    for arm in ORDERINGS:
        assert store.manifest(f"{arm}-s0-H-3")["parent"]["name"] == "reasoning-rkl-s0-H-2"
        assert by_arm[arm]["tokens"] > by_arm["reasoning-rkl"]["tokens"]
    assert json.loads((store.get_checkpoint("reasoning-rkl-kl-s0-H-3") / "stage.json").read_text())["stage"] == "kl_step"
    ce_run = json.loads((store.get_checkpoint("reasoning-rkl-ce-s0-H-2") / "run_config.json").read_text())
    assert ce_run["train"]["ce_weight"] == 0.5 and ce_run["train"]["loss"] == "reverse_kl"
    # the even mix trained on both sources
    mix_meta = json.loads((store.get_checkpoint("mix-rkl-s0-H-2") / "stage.json").read_text())
    assert mix_meta["data"]["name"] == "mix-train" and "generic" in mix_meta["data"]["source"]
    md = (results / "ablation-cpu.md").read_text()
    assert "device: cpu" in md and "python -m flows.ablation" in md
    assert all(f"| {arm.name} |" in md for arm in ARMS) and "| teacher |" in md
    assert "## Which claims hold" in md and "- KL-guided order vs MMR order past 50% (answer_accuracy): " in md
    assert (results / "ablation-cpu.png").stat().st_size > 0

    client = mlflow.MlflowClient(tracking_uri=mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(mlflow_experiment)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.run_name == "abl-ablation"
    assert {"ablation-cpu.json", "ablation-cpu.md", "ablation-cpu.png"} <= \
        {item.path for item in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=200)
    arm_runs = [run for run in children if run.data.tags.get("stage") == "ablation"]
    assert sorted(run.data.tags["checkpoint"] for run in arm_runs) == sorted(arm.name for arm in ARMS)
    assert all("answer_accuracy_mean" in run.data.metrics for run in arm_runs)
    stage_runs = [run for run in children if run.data.tags.get("stage") != "ablation"]
    assert len(stage_runs) == sum(EXPECTED_CALLS.values())

    for name in calls:
        calls[name] = 0
    again = ablation(overrides=overrides)
    assert sum(calls.values()) == 0 and again["ran"] == []
    assert json.loads((results / "ablation-cpu.json").read_text()) == report
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    rerun_children = client.search_runs([experiment.experiment_id],
                                        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                        max_results=200)
    assert len(rerun_children) == len(children)  # unchanged results: no new arm runs


def test_ablation_plan_refuses_a_schedule_without_a_continuation(tmp_path):
    cfg = compose(["experiment=tiny", "schedule.counts=[2]", f"storage.uri={tmp_path}"])
    problems = check_ablation(cfg).problems
    assert len(problems) == 1 and "at least one later count" in problems[0]


def test_summary_and_comparisons_state_the_spread():
    records = [{"arm": arm, "data": "reasoning", "loss": "reverse_kl", "ordering": "loo", "n_mamba": 2, "seed": seed,
                "tokens": 100, "answer_accuracy": accuracy, "nll_reasoning": 1.0, "nll_generic": 2.0,
                "kl_to_teacher": 0.1}
               for arm, values in (("reasoning-rkl", (0.5, 0.7)), ("generic-rkl", (0.1, 0.2)))
               for seed, accuracy in enumerate(values)]
    summary = summarize(records)
    assert [row["arm"] for row in summary] == ["reasoning-rkl", "generic-rkl"]
    assert summary[0]["answer_accuracy"] == pytest.approx(0.6)
    assert summary[0]["answer_accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    (claim,) = compare(summary)
    assert claim["difference"] == pytest.approx(0.45)
    assert claim["spread"] == pytest.approx(((0.02 / 2) + (0.005 / 2)) ** 0.5)
    assert [device_tag(name) for name in ("NVIDIA H200", "cpu", "NVIDIA A100-SXM4-80GB")] == ["h200", "cpu", "a100"]


def test_ablation_keys_share_the_teacher_and_loo_and_separate_arms_and_seeds():
    """The ablation's teacher and LOO calls are the conversion chain's (one teacher, one ranking, shared with
    `make pipeline`); every arm and seed has keys of its own; the seed reaches the distillations only."""
    from pipeline.ablation import run_ablation
    from pipeline.chain import run_chain
    from tests.chain.test_cache_keys import KeyRecorder

    cfg = compose(["experiment=tiny", "ablation.seeds=[0,1]"])
    chain, walked = KeyRecorder(), KeyRecorder()
    run_chain(cfg, chain, None, until="loo")
    run_ablation(cfg, walked, None)
    assert {name: walked.keys[name] for name in ("teacher", "loo")} == chain.keys
    conversions = [name for name in walked.keys if name.endswith(("-H-2", "-H-3"))
                   and not name.startswith(("quality-", "mmr-", "kl-"))]
    assert len(conversions) == 2 * len(ARMS)  # (5 first + 3 continued) x 2 seeds
    assert len({walked.keys[name] for name in conversions}) == len(conversions)
    assert len({walked.keys[name] for name in walked.keys}) == len(walked.keys)


def test_even_mix_holds_as_many_rows_of_reasoning_traces_as_of_generic_text():
    import dataclasses

    from pipeline.data import build_char_tokenizer
    from pipeline.stages.common import StageData, distillation_source

    cfg = compose(["experiment=tiny", "data.distill_on=mix", "data.demo.n_text_train=100"])
    view = cfg.data.for_distillation()
    assert (view.distill_on, distillation_source(view)) == ("mix", "mix")
    assert view == dataclasses.replace(cfg.data.view("distill", "generic"), distill_on="mix")
    data = StageData(view, build_char_tokenizer())
    mixed = data.tokenized("mix")
    reasoning, generic = data.tokenized("distill"), data.tokenized("generic")
    assert data.mix_share() == 100 < len(data.rows("distill", "train"))
    assert len(mixed) == 200
    # the first 100 rows of each source, every one of them once
    assert mixed[:100]["input_ids"] == reasoning[:100]["input_ids"]
    assert mixed[100:]["input_ids"] == generic[:100]["input_ids"]
    assert data.describe("mix")["rows"] == 200


def test_a_subset_of_arms_walks_only_their_stages_and_the_prefix_they_continue():
    from pipeline.ablation import run_ablation
    from tests.chain.test_cache_keys import KeyRecorder

    walked = KeyRecorder()
    results = run_ablation(compose(["experiment=tiny", "ablation.seeds=[1]", "ablation.arms=[reasoning-rkl-loo]"]),
                           walked, None)
    assert [result.arm.name if result.arm else "teacher" for result in results] == ["reasoning-rkl-loo", "teacher"]
    assert list(walked.keys) == ["teacher", "loo", "reasoning-rkl-s1-H-2", "reasoning-rkl-loo-s1-H-3",
                                 "quality-reasoning-rkl-loo-s1-H-3", "quality-teacher"]
    problems = check_ablation(compose(["experiment=tiny", "ablation.arms=[reasoning]"])).problems
    assert len(problems) == 1 and "ablation.arms: unknown ['reasoning']" in problems[0]


def test_generic_text_from_the_teachers_samples_reaches_the_generic_arms_and_every_scoring():
    """data.generic=teacher: the samples stage once after the teacher; its output is the `generic` input of the
    generic and mix arms' conversions and of every quality call, and of nothing that reads no generic text."""
    from pipeline.ablation import run_ablation
    from tests.chain.test_cache_keys import ContentRecorder

    recorder = ContentRecorder()
    run_ablation(compose(["experiment=tiny", "ablation.seeds=[0]", "data.generic=teacher"]), recorder, None)
    assert list(recorder.keys)[:3] == ["teacher", "teacher-samples", "loo"]
    reads = {name for name, inputs in recorder.inputs.items() if "generic" in inputs}
    assert all(recorder.inputs[name]["generic"].name == "teacher-samples" for name in reads)
    assert reads == {"generic-rkl-s0-H-2", "mix-rkl-s0-H-2"} | {name for name in recorder.keys
                                                                 if name.startswith("quality-")}
    plain = ContentRecorder()
    run_ablation(compose(["experiment=tiny", "ablation.seeds=[0]"]), plain, None)
    same = {name for name in plain.keys if plain.keys[name] == recorder.keys.get(name)}
    assert same == set(plain.keys) - reads  # the reasoning arms and orderings keep their keys


def test_the_generic_arm_distils_on_the_teachers_samples(tmp_path):
    """The generic arm through the executor with data.generic=teacher (the tiny teacher's own samples): it
    trains on the samples' train split, and the scorings measure NLL on their test split."""
    from pipeline.ablation import collect_records, run_ablation
    from pipeline.executor import Executor

    cfg = compose(["experiment=tiny", "run_name=gen", "ablation.seeds=[0]", "ablation.arms=[generic-rkl]",
                   "data.generic=teacher", "data.samples.train=24", "data.samples.validation=2",
                   "data.samples.test=8", "data.samples.max_new_tokens=24", "data.samples.batch_size=8"])
    store = open_store(str(tmp_path / "store" / "gen"))
    results = run_ablation(cfg, Executor(store, tmp_path / "work"), None)
    teacher, (record,) = collect_records(results, lambda output: store.get_checkpoint(output.name))
    meta = json.loads((store.get_checkpoint("generic-rkl-s0-H-2") / "stage.json").read_text())
    assert meta["data"]["name"] == "generic-train" and meta["data"]["rows"] == 24
    assert "teacher-samples" in meta["data"]["source"]
    samples = store.get_checkpoint("teacher-samples")
    assert len((samples / "test.jsonl").read_text().splitlines()) == 8
    assert 0 < teacher["nll_generic"] < record["nll_generic"] + 5 and record["kl_generic"] > 0


def test_a_plain_reading_of_each_claim():
    from pipeline.ablation import reading

    row = {"claim": "c", "arm": "a", "versus": "b", "metric": "answer_accuracy", "difference": 0.1, "spread": 0.02}
    assert reading(row).endswith("a is better than b by 0.1000 ± 0.0200: holds (beyond 2 s.e.).")
    assert reading({**row, "difference": -0.1}).endswith("is reversed (beyond 2 s.e.).")
    assert reading({**row, "spread": 0.06}).endswith("not resolved (within 2 s.e.).")
    assert "a is worse than b" in reading({**row, "metric": "kl_to_teacher"})  # a higher KL is worse
    assert reading({**row, "spread": None}).endswith("no spread to judge it by.")
    assert "same layers on 2 of 3 seeds" in reading({**row, "same_layers": 2, "seeds_compared": 3})


@pytest.mark.parametrize(("override", "message"), [
    ("ablation.ce_weight=0", "ablation.ce_weight must be a number > 0, got 0"),
    ("ablation.report_name=a/b", "ablation.report_name must be a file name without '/', got 'a/b'"),
    ("schedule.selection=random", "schedule.selection must be one of mmr, loo, kl, got 'random'"),
])
def test_new_settings_refuse_bad_values_in_one_line(override, message):
    from flows.config import ConfigCompositionError

    with pytest.raises(ConfigCompositionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose(["experiment=tiny", override])


def test_the_plan_refuses_mmr_steps_on_the_teachers_samples(tmp_path):
    """data.distill_on=generic with data.generic=teacher: the MMR trials cannot read the samples, so the plan
    says so in one line before anything runs (selection kl or loo can)."""
    from flows.convert import check_run

    cfg = compose(["experiment=tiny", "data.generic=teacher", "data.distill_on=generic", f"storage.uri={tmp_path}",
                   "tracking.enabled=false"])
    problems = check_run(cfg).problems
    assert problems == ["data.distill_on=generic with data.generic=teacher: the MMR trials cannot read the teacher's "
                        "samples yet; use schedule.selection=kl or loo for the later steps"]
    cfg = compose(["experiment=tiny", "data.generic=teacher", "data.distill_on=generic", "schedule.selection=kl",
                   f"storage.uri={tmp_path}", "tracking.enabled=false"])
    assert check_run(cfg).problems == []
