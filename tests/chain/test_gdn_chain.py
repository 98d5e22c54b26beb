"""The whole chain with schedule.mixers=[mamba, gdn] on the tiny preset: MMR picks a mixer per layer, the
evaluation reports both kinds, and a re-run computes nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.chain import run_local
from pipeline.stages.mmr import MMR_FILE

from tests.stages.conftest import tiny_config


@pytest.mark.slow
def test_chain_with_both_mixers(tmp_path, capsys):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, counts=[1, 3], mixers=["gdn", "mamba"]))
    outputs = run_local(cfg, tmp_path / "store", work_root=tmp_path / "work")
    first = json.loads((outputs["H-1"] / "stage.json").read_text())
    assert first["layer_pattern"].count("G") == 1 and first["n_gdn"] == 1  # the first conversion: mixers[0]
    mmr = json.loads((outputs["mmr-H-1"] / MMR_FILE).read_text())
    assert mmr["mixers"] == ["gdn", "mamba"] and len(mmr["ranking"]) == 2 * 3 and mmr["n_gdn"] == 1
    step = json.loads((outputs["H-3"] / "stage.json").read_text())
    best = {}
    for entry in mmr["ranking"]:
        best.setdefault(entry["layer"], entry["mixer"])
    assert step["converted_mixers"] == {str(layer): best[layer] for layer in step["converted_layers"]}
    summary = {row["checkpoint"]: row for row in json.loads((outputs["evaluate"] / "summary.json").read_text())}
    assert set(summary) == {"teacher", "H-1", "H-3", "H-3-SFT"}
    assert summary["H-3"]["layer_pattern"] == step["layer_pattern"]
    assert summary["H-3"]["n_mamba"] + summary["H-3"]["n_gdn"] == 3 and "n_gdn" not in summary["teacher"]
    capsys.readouterr()
    again = run_local(cfg, tmp_path / "store", work_root=tmp_path / "work")
    assert again.keys() == outputs.keys() and "] done in" not in capsys.readouterr().out  # every stage found
