"""benchmarks/device_parity.py and benchmarks/mmr_spread.py on the CPU: the parity check compared with itself
(the same seed on the same machine gives the same chain to the bit: every difference 0), and the MMR
spread's choice statistics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_parity_chain_against_itself_on_the_cpu_differs_nowhere(tmp_path):
    parity = _module("device_parity")
    teacher, reference = tmp_path / "teacher", tmp_path / "reference.json"
    parity.main(["reference", "--preset", "tiny", "--train-teacher", "--teacher", str(teacher),
                 "--root", str(tmp_path / "ref"), "--out", str(reference)])
    recorded = json.loads(reference.read_text())
    stages = recorded["stages"]
    assert {"teacher", "loo", "H-2", "mmr-H-2", "H-3", "H-3-SFT", "evaluate"} <= set(stages)
    assert len(stages["H-2"]["curve"]) == 6 and len(stages["mmr-H-2"]["trials"]) == 2 * 2  # 2 candidates x 2 draws
    assert sorted(recorded["initialisation"]["trials"]) == ["2/0", "2/1", "3/0", "3/1"]

    again = parity.one_run("fp32", 0, "cpu", teacher, tmp_path / "again", "tiny")
    result = parity.compare(again, recorded)
    assert result["initial_weights_identical"] and result["chooses_reference_layers"]
    assert result["max_rel_loss_diff"] == 0.0 and result["max_abs_accuracy_diff"] == 0.0
    for row in result["stages"]:
        assert row.get("same_layers", True) and row.get("same_weights", True), row
        assert row.get("max_rel_loss_diff") in (None, 0.0), row
    for quality in result["quality"]:
        assert quality["nll"] == quality["reference_nll"]
        assert quality["kl_to_teacher"] == quality["reference_kl_to_teacher"]

    # and a run that differs is told apart: another first MMR choice, one step's loss, one initial mixer
    changed = json.loads(json.dumps(again))
    changed["stages"]["H-3"]["converted_layers"] = [3]
    changed["stages"]["H-2"]["curve"][4] *= 1.001
    changed["initialisation"]["trials"]["2/1"] = "0" * 64
    differs = parity.compare(changed, recorded)
    assert not differs["chooses_reference_layers"] and not differs["initial_weights_identical"]
    assert differs["max_rel_loss_diff"] == pytest.approx(1e-3)


def test_relative_differences_and_the_mmr_choice_statistics():
    parity, spread = _module("device_parity"), _module("mmr_spread")
    assert parity.max_relative_difference([1.0, 2.2], [1.0, 2.0]) == pytest.approx(0.1)
    assert parity.max_relative_difference([1.0], [1.0, 2.0]) is None
    # layer 4 is best on average; one draw of layer 1 beats it
    losses = {1: [0.5, 0.9, 0.9], 4: [0.6, 0.6, 0.6], 6: [1.0, 1.1, 1.2]}
    rows = spread.choices_agreement(losses, chosen=1)
    assert [row["seeds"] for row in rows] == [1, 2, 3]
    assert rows[0]["choices"] == {"1": 1, "4": 2} and rows[0]["same_as_all_draws"] == pytest.approx(2 / 3)
    assert rows[1]["choices"] == {"4": 3}  # every pair of draws: layer 1's mean is 0.7 or 0.9, above 0.6
    assert rows[2] == {"seeds": 3, "subsets": 1, "same_as_all_draws": 1.0, "choices": {"4": 1}}
