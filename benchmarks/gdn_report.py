"""Gated DeltaNet against Mamba-1: one record and one page from the GPU run's outputs (no torch needed).

Inputs (any may be missing; the page says what is): the throughput record of `benchmarks/throughput.py`
(teacher, H-25/30/40 with Mamba-1, with Gated DeltaNet and mixed, at 4k and 16k), the quality record of
`benchmarks/gpu_pipeline.py mixers` (H-K per mixer on gpu_demo, seeds), and the log of the GPU tests
(`tests/model/test_gdn_gpu.py`, kernels against the reference).

Usage: python benchmarks/gdn_report.py --throughput t.json --quality q.json --tests tests.log \\
           --command "..." --out-dir benchmarks/results   (writes gdn-h200.json and gdn-h200.md)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

GOAL = ("H-30-GDN", 16384, 2.0)  # the goal: prefill + 512 decode end to end >= 2x the teacher at 16k


def load(path: str | None):
    if not path or not Path(path).is_file():
        return None
    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else text


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def quality_section(quality: dict | None) -> list[str]:
    if quality is None:
        return ["## Quality on gpu_demo", "", "Not measured (no quality record)."]
    teacher = quality.get("teacher", {})
    lines = ["## Quality on gpu_demo: H-K with Mamba-1 against H-K with Gated DeltaNet", "",
             f"One teacher ({teacher.get('steps')} steps, {teacher.get('seconds')} s, held-out accuracy "
             f"{fmt(teacher.get('answer_accuracy'))}), copied into every run; each run: LOO, then the first "
             "conversion to K layers of one mixer (the same LOO layers for both mixers), the preset's "
             f"distillation, scored on {next((r.get('examples') for r in quality['runs'] if 'examples' in r), '?')} "
             f"held-out problems in fp32. {quality.get('concurrent_processes')} concurrent processes, "
             f"{quality.get('total_seconds')} s in all. Mean +- sample sd over seeds.", "",
             "| mixer | K | seeds | answer accuracy | NLL | KL to teacher | patterns |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in quality["summary"]:
        cells = [f"{fmt(row[k], 4)} +- {fmt(row[k + '_sd'], 4)}" for k in ("answer_accuracy", "nll", "kl_to_teacher")]
        lines.append(f"| {row['mixer']} | {row['count']} | {len(row['seeds'])} | {' | '.join(cells)} | "
                     f"{', '.join(row['patterns'])} |")
    failed = [r for r in quality["runs"] if "error" in r]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r.get('mixer')} K={r.get('count')} seed {r.get('seed')}: "
                                                    f"{r['error']}" for r in failed)]
    lines += ["", "Per run:", "", "| mixer | K | seed | accuracy | NLL | KL | conversion s | tokens/s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in quality["runs"] if "error" not in r), key=lambda r: (r["mixer"], r["count"], r["seed"])):
        stage = next((s for s in r.get("stages", []) if s["kind"] == "convert"), {})
        lines.append(f"| {r['mixer']} | {r['count']} | {r['seed']} | {fmt(r['answer_accuracy'])} | {fmt(r['nll'], 4)} | "
                     f"{fmt(r['kl_to_teacher'], 4)} | {stage.get('seconds', '-')} | {stage.get('tokens_per_s', '-')} |")
    return lines


def throughput_section(throughput: dict | None) -> list[str]:
    if throughput is None:
        return ["## Throughput at the Apriel-15B shape", "", "Not measured (no throughput record)."]
    records = throughput["records"]
    lines = ["## Throughput at the Apriel-15B shape (random bf16 weights, one engine, each model at its largest batch)",
             "", f"Device {throughput.get('device')}, torch {throughput.get('torch')}, transformers "
             f"{throughput.get('transformers')}; measured copy bandwidth "
             f"{throughput.get('measured_copy_bytes_per_s', 0) / 1e12:.2f} TB/s. Prefill measured on "
             f"{next((r.get('prefill_measured_sequences') for r in records if 'error' not in r), '?')} sequence(s) "
             "and scaled to the batch; "
             f"{next((r.get('decode_steps_timed') for r in records if 'error' not in r), '?')} decode steps timed "
             "(the middle of the 512) and scaled to 511. `total` = batch x 512 / (prefill + decode): the prompt of "
             "total - 512 tokens, then 512 generated.", "",
             "| model | total len | batch | prefill s (batch) | decode tok/s | decode ratio | total tok/s | "
             "total ratio | HBM fraction |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['total_len']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['total_len']} | {r['batch']} | {r['prefill_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['ratio_to_teacher']:.2f} | {r['total_tokens_per_s']:,.0f} | "
                     f"{r['total_ratio_to_teacher']:.2f} | {r['hbm_fraction']:.2f} |")
    name, length, target = GOAL
    goal = next((r for r in records if r["model"] == name and r["total_len"] == length and "error" not in r), None)
    mamba = next((r for r in records if r["model"] == "H-40" and r["total_len"] == length and "error" not in r), None)
    lines += [""]
    failed = next((r for r in records if r["model"] == name and r["total_len"] == length and "error" in r), None)
    if goal is None:
        lines.append(f"**Goal ({name} at {length}, prefill + 512 decode end to end >= {target}x the teacher): not "
                     f"measured{f' ({name} failed: ' + failed['error'] + ')' if failed else ' (no record)'}.**")
    else:
        verdict = "met" if goal["total_ratio_to_teacher"] >= target else "not met"
        lines.append(f"**Goal ({name} at {length}, prefill + 512 decode end to end >= {target}x the teacher): "
                     f"{goal['total_ratio_to_teacher']:.2f}x, {verdict}.** Mamba-1's H-40 in the same run: "
                     f"{fmt(mamba and mamba['total_ratio_to_teacher'], 2)}x.")
    paths = {}
    for r in records:
        for op, used in (r.get("kernel_paths") or {}).items():
            paths.setdefault(op, set()).update(used)
    lines += ["", "Kernels that ran: " + "; ".join(f"{op}: {', '.join(sorted(used))}" for op, used in sorted(paths.items()))]
    return lines


def tests_section(log: str | None) -> list[str]:
    if log is None:
        return ["## Kernels against the reference", "", "Not run (no test log)."]
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    pattern = r"(chunk torch|fused recurrent|mixer grads|engine vs|bf16 fused|torch\.(float32|bfloat16): ).*"
    figures = [match.group(0) for line in log.splitlines() if (match := re.search(pattern, line))]
    return ["## Kernels against the reference (`tests/model/test_gdn_gpu.py`)", "",
            "Relative errors ||fla-core - reference|| / ||reference|| (reference: the PyTorch chunked delta rule "
            "in fp32 on the same inputs):", "", "```", *figures, "```", "",
            f"Result: {summary[-1].strip('= ') if summary else 'no pytest summary line in the log'}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--throughput")
    parser.add_argument("--quality")
    parser.add_argument("--tests")
    parser.add_argument("--command", default="")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default="gdn-h200")
    args = parser.parse_args()
    throughput, quality, tests = load(args.throughput), load(args.quality), load(args.tests)
    device = (throughput or {}).get("device") or ((quality or {}).get("environment") or {}).get("device")
    date = (throughput or {}).get("date") or ((quality or {}).get("environment") or {}).get("date")
    record = {"command": args.command, "device": device, "date": date, "throughput": throughput, "quality": quality,
              "tests_log_tail": tests.splitlines()[-40:] if tests else None}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    page = [f"# Gated DeltaNet against Mamba-1 ({device})", "", f"- Command: `{args.command}`",
            f"- Device: {device}; date: {date}.", "",
            *tests_section(tests), "", *quality_section(quality), "", *throughput_section(throughput), ""]
    (out / f"{args.name}.md").write_text("\n".join(page))
    print("\n".join(page))


if __name__ == "__main__":
    main()
