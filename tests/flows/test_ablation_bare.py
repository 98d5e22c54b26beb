"""experiment=smollm2_ablation and the ablation run bare (benchmarks/gpu_ablation.py, as on a GPU machine without
Prefect, MLflow or Hydra): the preset composes, its plan (the real SmolLM2 GGUF's header and tokenizer only)
lists every stage call of its three seeds, and the bare runner runs a tiny ablation in parts and writes the
report. Kept apart from test_ablation_flow.py, the wiring test, so that file stays under two minutes."""

from __future__ import annotations

import json

from flows.ablation import check_ablation
from flows.config import compose


def test_smollm2_ablation_composes_and_its_plan_lists_every_stage_call(smollm2_gguf, tmp_path):
    """experiment=smollm2_ablation: the smollm2 teacher and settings, its own store, generic text from the
    teacher's samples with train rows for the generic arms; --plan (the GGUF's header and tokenizer only)
    lists every call of the three seeds and finds no problem (on the CPU: hardware=cpu)."""
    import dataclasses

    cfg = compose(["experiment=smollm2_ablation", f"teacher.path={smollm2_gguf}", "hardware=cpu",
                   f"storage.uri={tmp_path / 'store'}", f"storage.cache_dir={tmp_path / 'cache'}",
                   "tracking.enabled=false"])
    smollm2 = compose(["experiment=smollm2", f"teacher.path={smollm2_gguf}"])
    assert cfg.run_name == "smollm2-ablation" and cfg.ablation.seeds == [0, 1, 2]
    assert (cfg.train, cfg.mmr, cfg.teacher.finetune, cfg.schedule) == \
        (smollm2.train, smollm2.mmr, smollm2.teacher.finetune, smollm2.schedule)
    assert cfg.schedule.counts == [15, 18, 21, 24] and cfg.data.generic == "teacher"
    assert cfg.data.samples.train >= 4096 and cfg.ablation.report_name == "ablation-smollm2"
    assert dataclasses.replace(cfg.data, samples=smollm2.data.samples) == smollm2.data
    checked = check_ablation(cfg)
    assert checked.problems == []
    names = [row.name for row in checked.rows]
    expected = ["teacher", "teacher-ft", "teacher-samples", "loo"]
    for seed in (0, 1, 2):
        for arm in ("reasoning-rkl", "generic-rkl", "mix-rkl", "reasoning-fkl", "reasoning-rkl-ce"):
            expected += [f"{arm}-s{seed}-H-15", f"quality-{arm}-s{seed}-H-15"]
        for arm, scoring in (("reasoning-rkl-mmr", "mmr"), ("reasoning-rkl-loo", None), ("reasoning-rkl-kl", "kl")):
            previous = f"reasoning-rkl-s{seed}-H-15"
            for count in (18, 21, 24):
                if scoring:
                    expected.append(f"{scoring}-{previous}")
                previous = f"{arm}-s{seed}-H-{count}"
                expected.append(previous)
            expected.append(f"quality-{previous}")
    expected.append("quality-teacher-ft")  # the fine-tuned teacher is the run's teacher
    assert names == expected
    stages = {row.name: row.stage for row in checked.rows}
    assert stages["teacher-ft"] == "teacher_finetune" and stages["teacher-samples"] == "samples"
    assert stages["kl-reasoning-rkl-kl-s2-H-21"] == "kl" and stages["reasoning-rkl-kl-s2-H-24"] == "kl_step"
    assert all(row.status == "run" for row in checked.rows)


BARE = ("import runpy, sys\n"
        "for name in ('prefect', 'mlflow', 'hydra', 'omegaconf', 'boto3'):\n"
        "    sys.modules[name] = None  # a GPU machine has none of them\n"
        "sys.argv = ['benchmarks/gpu_ablation.py', *sys.argv[1:]]\n"
        "runpy.run_path('benchmarks/gpu_ablation.py', run_name='__main__')\n")


def bare(*args, env=None, timeout=600):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", BARE, *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(repo), **(env or {})})


def test_the_bare_runner_plans_smollm2_ablation_without_prefect_mlflow_or_hydra(smollm2_gguf, tmp_path):
    result = bare("--experiment", "smollm2_ablation", "--root", str(tmp_path), "--plan", "hardware.device=cpu",
                  "hardware.precision=fp32", env={"HYBRID_SMOLLM2_GGUF": str(smollm2_gguf)})
    assert result.returncode == 0, result.stderr[-2000:]
    names = [line.split()[1] for line in result.stdout.splitlines()[1:] if not line.startswith(("note:", "problem:"))]
    assert names[:4] == ["teacher", "teacher-ft", "teacher-samples", "loo"] and names[-1] == "quality-teacher-ft"
    assert len(names) == 4 + 3 * (5 * 2 + 3 * 3 + 2 * 3 + 3) + 1  # per seed: 5 firsts + scorings, 9 steps, 3 scorings
    assert "kl-reasoning-rkl-s2-H-15" in names and "reasoning-rkl-kl-s2-H-24" in names
    assert not (tmp_path / "smollm2-ablation").exists()


def test_the_bare_runner_runs_in_parts_and_writes_the_report(tmp_path):
    """The tiny ablation without Prefect, MLflow or Hydra: a deadline stops it before a stage (exit 3), the
    same command continues from the store, and a rerun computes nothing and writes the same report."""
    args = ("--experiment", "tiny", "--root", str(tmp_path / "root"), "--results-dir", str(tmp_path / "out"),
            "ablation.seeds=[0]", "ablation.arms=[reasoning-rkl-kl,reasoning-rkl-ce]")
    stopped = bare(*args, "--deadline-s", "0")
    assert stopped.returncode == 3 and "stopped before teacher" in stopped.stdout, stopped.stderr[-2000:]
    first = bare(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "ablation-cpu.json").read_text())
    assert [record["arm"] for record in report["records"]] == ["reasoning-rkl-ce", "reasoning-rkl-kl"]
    assert "kl_scoring_sequences" in report["records"][1]
    timings = [json.loads(line) for line in (tmp_path / "out" / "ablation-stages.jsonl").read_text().splitlines()]
    assert {row["name"] for row in timings if row["ran"]} >= {"teacher", "loo", "kl-reasoning-rkl-s0-H-2"}
    again = bare(*args)
    assert again.returncode == 0 and "0 stages computed" in again.stdout, again.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "ablation-cpu.json").read_text()) == report


def test_the_bare_runner_spreads_seeds_over_processes_and_computes_shared_stages_once(tmp_path):
    result = bare("--experiment", "tiny", "--root", str(tmp_path / "root"), "--results-dir", str(tmp_path / "out"),
                  "--parallel", "2", "ablation.seeds=[0,1]", "ablation.arms=[reasoning-rkl-kl]")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    computed = [json.loads(line)["name"] for line in (tmp_path / "out" / "ablation-stages.jsonl").read_text().splitlines()
                if json.loads(line)["ran"]]
    assert sorted(computed) == sorted(set(computed))  # nothing computed twice, by either process
    assert {"teacher", "loo", "quality-teacher"} <= set(computed)
    assert {"kl-reasoning-rkl-s0-H-2", "kl-reasoning-rkl-s1-H-2"} <= set(computed)
    report = json.loads((tmp_path / "out" / "ablation-cpu.json").read_text())
    assert sorted((record["arm"], record["seed"]) for record in report["records"]) == \
        [("reasoning-rkl-kl", 0), ("reasoning-rkl-kl", 1)]
