"""Gated DeltaNet through the stages: a first conversion to it, MMR over (layer, mixer) pairs, a step that gives
each layer the mixer of its best pair, and the Mamba-only files left exactly as they were."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, GDNConfig, ScheduleConfig
from pipeline.stages import run_convert, run_mmr, run_step
from pipeline.stages.loo import run_loo
from pipeline.stages.mmr import MMR_FILE, TRIALS_FILE, choose_conversions, mmr_candidates, rank_pairs

from tests.stages.conftest import RecordingReporter, tiny_config

MIXERS = ["mamba", "gdn"]


@pytest.fixture(scope="module")
def loo_dir(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("loo")
    cfg = tiny_config()
    run_loo(cfg.loo, cfg.data.view("eval", "distill"), cfg.hardware, 2, teacher=tiny_teacher, out_dir=out,
            work_dir=out / "work", reporter=RecordingReporter())
    return out


def convert(cfg, teacher, loo, out_dir, work_dir, **mixer):
    return run_convert(cfg.train, cfg.mamba, cfg.data.view("distill"), cfg.hardware, cfg.seed, cfg.schedule.counts[0],
                       teacher=teacher, loo=loo, out_dir=out_dir, work_dir=work_dir, reporter=RecordingReporter(),
                       **mixer)


def score(cfg, teacher, parent, out_dir, work_dir, reporter=None, **mixers):
    return run_mmr(cfg.mmr, cfg.data.view("distill"), cfg.hardware, cfg.seed, teacher=teacher, parent=parent,
                   out_dir=out_dir, work_dir=work_dir, reporter=reporter or RecordingReporter(), **mixers)


def test_first_conversion_to_gdn(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()
    meta = convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w", mixer="gdn", gdn=GDNConfig(d_conv=3))
    body = json.loads((tmp_path / "H-2" / "config.json").read_text())
    layers = meta["converted_layers"]
    assert [body["layer_types"][i] for i in layers] == ["gated_delta_net"] * 2 and body["gdn_conv_kernel"] == 3
    assert meta["checkpoint"] == "H-2" and meta["n_mamba"] == 0 and meta["n_gdn"] == 2
    assert meta["converted_mixers"] == {str(layer): "gdn" for layer in layers}
    assert meta["layer_pattern"].count("G") == 2 and meta["final_distill_loss"] > 0


def test_mmr_scores_pairs_and_the_step_takes_each_layers_best_mixer(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w")  # the default: Mamba
    reporter = RecordingReporter()
    result = score(cfg, tiny_teacher, tmp_path / "H-2", tmp_path / "mmr", tmp_path / "mw", reporter,
                   mixers=MIXERS, gdn=GDNConfig())
    pattern = json.loads((tmp_path / "H-2" / "stage.json").read_text())["layer_pattern"]
    attention = [i for i, kind in enumerate(pattern) if kind == "A"]
    assert sorted((e["layer"], e["mixer"]) for e in result["ranking"]) == sorted(mmr_candidates(attention, MIXERS))
    assert result["mixers"] == MIXERS and result["n_mamba"] == 2 and result["n_gdn"] == 0
    losses = [e["loss"] for e in result["ranking"]]
    assert losses == sorted(losses) and all(loss > 0 for loss in losses)
    assert sorted(reporter.trials) == sorted(f"layer-{i}{suffix}" for i in attention for suffix in ("", "-gdn"))
    assert json.loads((tmp_path / "mmr" / MMR_FILE).read_text()) == result
    assert (tmp_path / "mmr" / "mmr.png").stat().st_size > 1000
    trials = json.loads((tmp_path / "mw" / TRIALS_FILE).read_text())
    assert sorted(trials) == sorted([str(i) for i in attention] + [f"{i}:gdn" for i in attention])

    # The step takes the lowest pairs, a layer once: make layer a's Gated DeltaNet the easiest, then a's Mamba.
    a, b = attention
    mmr = json.loads((tmp_path / "mmr" / MMR_FILE).read_text())
    mmr["ranking"] = rank_pairs({(a, "gdn"): 0.1, (a, "mamba"): 0.2, (b, "mamba"): 0.3, (b, "gdn"): 0.4}, MIXERS)
    (tmp_path / "mmr" / MMR_FILE).write_text(json.dumps(mmr))
    meta = run_step(cfg.train, cfg.data.view("distill"), cfg.hardware, cfg.seed, 3, gdn=GDNConfig(),
                    teacher=tiny_teacher, parent=tmp_path / "H-2", mmr=tmp_path / "mmr", out_dir=tmp_path / "H-3",
                    work_dir=tmp_path / "sw", reporter=RecordingReporter())
    assert meta["converted_layers"] == [a] and meta["converted_mixers"] == {str(a): "gdn"}
    assert meta["checkpoint"] == "H-3" and (meta["n_mamba"], meta["n_gdn"]) == (2, 1)
    assert meta["layer_pattern"][a] == "G"

    # MMR of a parent with Gated DeltaNet layers, default mixers: its count is in the table, the step goes on.
    again = score(cfg, tiny_teacher, tmp_path / "H-3", tmp_path / "mmr3", tmp_path / "mw3")
    assert again["n_gdn"] == 1 and "mixers" not in again and {e["layer"] for e in again["ranking"]} == {b}
    meta = run_step(cfg.train, cfg.data.view("distill"), cfg.hardware, cfg.seed, 4, teacher=tiny_teacher,
                    parent=tmp_path / "H-3", mmr=tmp_path / "mmr3", out_dir=tmp_path / "H-4",
                    work_dir=tmp_path / "sw4", reporter=RecordingReporter())
    assert meta["checkpoint"] == "H-4" and meta["layer_pattern"].count("A") == 0


def test_default_mixers_write_the_mamba_only_table(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w")
    result = score(cfg, tiny_teacher, tmp_path / "H-2", tmp_path / "mmr", tmp_path / "mw")
    assert list(result) == ["n_mamba", "steps", "score_window", "seeds", "ranking"]  # the Mamba-only table
    assert all(list(entry) == ["layer", "loss", "std", "losses"] for entry in result["ranking"])
    trials = json.loads((tmp_path / "mw" / TRIALS_FILE).read_text())
    assert all(key.isdigit() and list(draws) == ["0"] for key, draws in trials.items())
    meta = json.loads((tmp_path / "H-2" / "stage.json").read_text())
    assert "n_gdn" not in meta and "converted_mixers" not in meta
    assert not [key for key in json.loads((tmp_path / "H-2" / "config.json").read_text()) if key.startswith("gdn_")]


def test_killed_mmr_of_pairs_resumes_at_the_missing_trials(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w")
    with pytest.raises(KeyboardInterrupt):  # 3 step metrics + 1 trial metric a trial: killed in the second
        score(cfg, tiny_teacher, tmp_path / "H-2", tmp_path / "mmr", tmp_path / "mw",
              RecordingReporter(fail_at_metric=6), mixers=MIXERS, gdn=GDNConfig())
    assert len(json.loads((tmp_path / "mw" / TRIALS_FILE).read_text())) == 1
    reporter = RecordingReporter()
    result = score(cfg, tiny_teacher, tmp_path / "H-2", tmp_path / "mmr", tmp_path / "mw", reporter,
                   mixers=MIXERS, gdn=GDNConfig())
    assert sum("(recorded)" in line for line in reporter.lines) == 1 and len(result["ranking"]) == 4


def test_mmr_of_both_mixers_with_two_initialisations(tiny_teacher, loo_dir, tmp_path):
    """mmr.seeds=2 with schedule.mixers=[mamba, gdn]: each Mamba pair is trained from two initialisations
    (mean, std, both losses), each Gated DeltaNet pair once (its initialisation draws nothing: std None), in
    trials.json, mmr.json and the published table."""
    import dataclasses

    from flows.publish import mmr_markdown

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, mmr=dataclasses.replace(cfg.mmr, seeds=2))
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w")
    reporter = RecordingReporter()
    result = score(cfg, tiny_teacher, tmp_path / "H-2", tmp_path / "mmr", tmp_path / "mw", reporter,
                   mixers=MIXERS, gdn=GDNConfig())
    pattern = json.loads((tmp_path / "H-2" / "stage.json").read_text())["layer_pattern"]
    attention = [i for i, kind in enumerate(pattern) if kind == "A"]
    assert result["seeds"] == 2 and result["mixers"] == MIXERS and result["n_gdn"] == 0
    assert sorted((e["layer"], e["mixer"]) for e in result["ranking"]) == sorted(mmr_candidates(attention, MIXERS))
    for entry in result["ranking"]:
        losses = entry["losses"]
        if entry["mixer"] == "mamba":
            assert len(losses) == 2 and losses[0] != losses[1]
            assert entry["loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
            assert entry["std"] == pytest.approx(abs(losses[1] - losses[0]) / 2**0.5, rel=1e-9)
        else:
            assert len(losses) == 1 and entry["std"] is None and entry["loss"] == losses[0]
    means = [e["loss"] for e in result["ranking"]]
    assert means == sorted(means)
    assert json.loads((tmp_path / "mmr" / MMR_FILE).read_text()) == result
    assert (tmp_path / "mmr" / "mmr.png").stat().st_size > 1000
    trials = json.loads((tmp_path / "mw" / TRIALS_FILE).read_text())
    assert {key: sorted(draws) for key, draws in trials.items()} == {
        **{str(i): ["0", "1"] for i in attention}, **{f"{i}:gdn": ["0"] for i in attention}}
    assert sorted(reporter.trials) == sorted(f"layer-{i}{suffix}" for i in attention
                                             for suffix in ("", "-init-1", "-gdn"))
    logged = {key for _, metrics in reporter.metrics for key in metrics}
    assert {"mmr/loss", "mmr/loss_std", "mmr/loss_gdn"} <= logged and "mmr/loss_std_gdn" not in logged
    table = mmr_markdown(tmp_path / "mmr", "H-2", "-").splitlines()
    assert "averaged over 2 initialisation(s)" in table[1] and "(Gated DeltaNet pairs: one)" in table[1]
    assert table[3] == "| rank | layer | mixer | loss |"
    rows = [line.split(" | ") for line in table[5:]]
    assert len(rows) == len(result["ranking"])
    for row, entry in zip(rows, result["ranking"]):
        assert (int(row[1]), row[2]) == (entry["layer"], entry["mixer"])
        assert ("±" in row[3]) == (entry["mixer"] == "mamba")


def test_choose_conversions_takes_a_layer_once():
    ranking = [{"layer": 5, "mixer": "gdn", "loss": 0.1}, {"layer": 5, "mixer": "mamba", "loss": 0.2},
               {"layer": 2, "mixer": "mamba", "loss": 0.3}, {"layer": 7, "mixer": "gdn", "loss": 0.4}]
    assert choose_conversions(ranking, 2) == {5: "gdn", 2: "mamba"}
    assert choose_conversions([{"layer": 3, "loss": 1.0}], 1) == {3: "mamba"}  # a Mamba-only table


@pytest.mark.parametrize("mixers, message", [
    ([], "non-empty list"), (["mamba", "kda"], r"unknown mixer\(s\) \['kda'\]"), (["gdn", "gdn"], "duplicates"),
])
def test_bad_mixers(mixers, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(mixers=mixers)


def test_the_plan_wants_the_gdn_kernels_on_cuda_only_when_gdn_is_listed(monkeypatch):
    import dataclasses

    import torch

    from pipeline.config import RunConfig
    from pipeline.model import kernels
    from pipeline.plan import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "test GPU")
    monkeypatch.setattr(kernels, "_mamba_ssm", lambda: ((None, None), ""))
    monkeypatch.setattr(kernels, "_causal_conv1d", lambda: ((None, None), ""))
    monkeypatch.setattr(kernels, "_fla", lambda: (None, "fla-core unavailable (ImportError: no module named fla)"))
    monkeypatch.delenv("HYBRID_KERNELS", raising=False)
    found, notes = [], []
    check_device(RunConfig(), found, notes)
    assert found == []  # Mamba only: fla-core is not needed
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, mixers=["mamba", "gdn"]))
    check_device(cfg, found, notes)
    assert len(found) == 1 and "without the Gated DeltaNet kernels (fla-core unavailable" in found[0]
    monkeypatch.setenv("HYBRID_KERNELS", "reference")
    found = []
    check_device(cfg, found, notes)
    assert found == []
