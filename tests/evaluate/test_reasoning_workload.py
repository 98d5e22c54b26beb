"""benchmarks/reasoning_workload.py on the CPU (--smoke): every model it names is built, its batch searched
and measured, and a run split in two takes the teacher of the first for its ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reasoning_workload.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *arguments], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_split_run_takes_the_earlier_teacher(tmp_path):
    first, second = tmp_path / "teacher.json", tmp_path / "gdn.json"
    done = run("--models", "teacher", "--out", str(first))
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("--models", "H-30-GDN", "--teacher-from", str(first), "--out", str(second))
    assert done.returncode == 0, done.stderr[-2000:]
    teacher = json.loads(first.read_text())["records"][0]
    records = {r["model"]: r for r in json.loads(second.read_text())["records"]}
    assert set(records) == {"teacher", "H-30-GDN"}
    gdn = records["H-30-GDN"]
    assert (gdn["mixer"], gdn["n_converted"], gdn["n_mamba"]) == ("gdn", 4, 0)  # 30 of 50 layers, of the smoke's 6
    assert gdn["batch"] >= 1 and gdn["total_tokens_per_s"] > 0
    assert gdn["ratio_to_teacher"] == pytest.approx(gdn["total_tokens_per_s"] / teacher["total_tokens_per_s"])
    assert records["teacher"]["teacher_from"] == str(first)


def test_a_teacher_from_another_workload_is_refused(tmp_path):
    first = tmp_path / "teacher.json"
    first.write_text(json.dumps({"workload": {"prompt_tokens": 99}, "device": "cpu", "records": []}))
    done = run("--models", "H-30-GDN", "--teacher-from", str(first), "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0
    assert "--teacher-from" in done.stderr and "not this run's" in done.stderr
    assert not (tmp_path / "x.json").exists()
