"""How much of an MMR score is the layer and how much the draw of its trial mixer (issue 22's `mmr.seeds`).

Runs a preset's chain up to its first conversion (teacher, LOO, H-counts[0]; through the one executor over
a folder store, so a store that already holds them is reused), then its first MMR round with `--draws`
independent initialisations of every candidate (the MMR stage itself, `mmr.seeds = --draws`; draw 0 is
the initialisation the stage uses with one seed). From the per-draw losses it reports, per candidate, the
mean, the standard deviation of one draw, and min / max; the gaps between the sorted candidate means; and,
for m = 1 .. draws, how often a stage with `mmr.seeds = m` would choose the same layers as the mean of all
draws (over every subset of m draws, the same subset for every candidate, which is what a stage with m
seeds is: draws are exchangeable). The layers chosen are the lowest `counts[1] - counts[0]`: what the
next step converts.

Writes JSON (--out), a Markdown table beside it (.md: command, device, date, settings, the figures) and the
stage's plot (.png).
Bare: needs torch, transformers, datasets and this package (no prefect / mlflow / hydra / boto3).

CPU, the default demo (with a store from `make pipeline` or any earlier run, the chain part is skipped):
    python benchmarks/mmr_spread.py --draws 5 --root /tmp/mmr-spread --out benchmarks/results/mmr-spread-cpu.json
GPU, gpu_demo (one H200: teacher ~150 s, H-4 and the trials ~2 min):
    python benchmarks/mmr_spread.py --experiment gpu_demo --draws 8 --out $OUT/mmr-spread-h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_pipeline import _merge, environment, preset_config  # noqa: E402

from pipeline.config import RunConfig, checkpoint_name  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=None, help="conf/experiment/<name>.yaml (default: the demo)")
    parser.add_argument("--draws", type=int, default=5, help="initialisations per candidate")
    parser.add_argument("--root", default="/tmp/mmr-spread", help="folder store root (<root>/<run_name>)")
    parser.add_argument("--run-name", default=None, help="run name in the store (default: the preset's)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="hardware.device (default: preset's)")
    parser.add_argument("--threads", type=int, default=None, help="hardware.threads (CPU)")
    parser.add_argument("--out", required=True, help="the JSON record (the .md goes beside it)")
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error("--draws must be at least 2 (a spread needs two draws)")
    return args


def spread_config(args) -> RunConfig:
    cfg = preset_config(args.experiment) if args.experiment else RunConfig()
    hardware = {key: value for key, value in (("device", args.device), ("threads", args.threads)) if value}
    changes = {"hardware": hardware} if hardware else {}
    if args.run_name:
        changes["run_name"] = args.run_name
    return _merge(cfg, changes) if changes else cfg


def choices_agreement(losses: dict[int, list[float]], chosen: int) -> list[dict]:
    """For m = 1 .. draws: over every subset of m draw indices (the same for every candidate), the share
    whose candidate means choose the same `chosen` lowest layers as the means of all draws."""
    layers = sorted(losses)
    draws = len(next(iter(losses.values())))

    def pick(indices) -> tuple[int, ...]:
        means = {layer: statistics.fmean(losses[layer][i] for i in indices) for layer in layers}
        return tuple(sorted(sorted(layers, key=lambda layer: (means[layer], layer))[:chosen]))

    reference = pick(range(draws))
    rows = []
    for m in range(1, draws + 1):
        picks = [pick(subset) for subset in itertools.combinations(range(draws), m)]
        counts: dict[tuple[int, ...], int] = {}
        for choice in picks:
            counts[choice] = counts.get(choice, 0) + 1
        rows.append({"seeds": m, "subsets": len(picks),
                     "same_as_all_draws": sum(p == reference for p in picks) / len(picks),
                     "choices": {",".join(map(str, choice)): count for choice, count in sorted(counts.items())}})
    return rows


# The recommended mmr.seeds: the fewest whose choice is the all-draws choice in at least AGREEMENT of the
# subsets and whose deciding pair flips with at most FLIP probability (normal approximation).
AGREEMENT, FLIP = 0.9, 0.05


def boundary_flip(candidates: list[dict], chosen: int, draws: int) -> list[dict] | None:
    """The pair that decides the choice (the last chosen and the first left out, by mean): for m seeds, the
    gap in standard errors of the difference of their m-draw means, z = gap / sqrt((s_a^2 + s_b^2) / m),
    and the chance that m draws put them the other way round (normal approximation, one-sided)."""
    if len(candidates) <= chosen:
        return None
    inside, outside = candidates[chosen - 1], candidates[chosen]
    gap, variance = outside["mean"] - inside["mean"], inside["std"] ** 2 + outside["std"] ** 2
    rows = []
    for m in range(1, draws + 1):
        z = gap / math.sqrt(variance / m) if variance > 0 else math.inf
        rows.append({"seeds": m, "layers": [inside["layer"], outside["layer"]], "z": z,
                     "flip_probability": 0.5 * math.erfc(z / math.sqrt(2))})
    return rows


def analyse(table: dict, chosen: int) -> dict:
    losses = {entry["layer"]: entry["losses"] for entry in table["ranking"]}
    candidates = []
    for entry in table["ranking"]:
        candidates.append({"layer": entry["layer"], "mean": entry["loss"], "std": entry["std"],
                           "min": min(entry["losses"]), "max": max(entry["losses"]), "losses": entry["losses"]})
    means = [c["mean"] for c in candidates]  # ranking order: ascending
    gaps = [b - a for a, b in zip(means, means[1:])]
    stds = [c["std"] for c in candidates]
    agreement = choices_agreement(losses, chosen)
    result = {
        "candidates": candidates,
        "gaps": gaps,
        "median_std": statistics.median(stds),
        "max_std": max(stds),
        "smallest_gap": min(gaps) if gaps else None,
        # the gap that decides the step's choice: between the last chosen and the first left out
        "deciding_gap": gaps[chosen - 1] if len(gaps) >= chosen else None,
        "chosen_layers": sorted(c["layer"] for c in candidates[:chosen]),
        "agreement": agreement,
        "boundary_flip": boundary_flip(candidates, chosen, len(candidates[0]["losses"])),
    }
    flips = {row["seeds"]: row["flip_probability"] for row in result["boundary_flip"] or []}
    result["recommended_seeds"] = next(
        (row["seeds"] for row in agreement if row["same_as_all_draws"] >= AGREEMENT
         and flips.get(row["seeds"], 0.0) <= FLIP), None)
    return result


def markdown(record: dict) -> str:
    result, settings = record["result"], record["settings"]
    recommended = result["recommended_seeds"] or f"more than {settings['draws']}"
    lines = [
        f"# MMR spread: {settings['preset']}, first MMR round (from {settings['parent']})",
        "",
        f"Command: `{record['environment']['command']}`  ",
        f"Device: {record['environment']['device']}, date {record['environment']['date']}, torch "
        f"{record['environment']['torch']}  ",
        f"Trials: {settings['steps']} steps, batch {settings['batch_size']}, score = mean distillation loss of the "
        f"last {settings['score_window']} steps; {settings['draws']} independent initialisations per candidate "
        f"(the same batches); {record['seconds_per_trial']:.1f} s a trial, MMR round {record['mmr_seconds']:.0f} s.",
        "",
        "| layer | mean | std (one draw) | min | max | draws |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in result["candidates"]:
        lines.append(f"| {c['layer']} | {c['mean']:.4f} | {c['std']:.4f} | {c['min']:.4f} | {c['max']:.4f} | "
                     f"{', '.join(f'{x:.3f}' for x in c['losses'])} |")
    lines += [
        "",
        f"Gaps between sorted means: {', '.join(f'{g:.4f}' for g in result['gaps'])}; the gap that decides the "
        f"next step's {settings['chosen']} layer(s): {result['deciding_gap']:.4f}; median std of one draw "
        f"{result['median_std']:.4f} (max {result['max_std']:.4f}). Chosen by the mean of all draws: "
        f"{result['chosen_layers']}.",
        "",
        f"Recommended `mmr.seeds` (the fewest whose choice is the all-draws choice in at least {AGREEMENT:.0%} of "
        f"the subsets and whose deciding pair below flips with at most {FLIP:.0%} probability): "
        f"{recommended}. "
        f"(Agreement with all {settings['draws']} draws overstates it for m near the draw count: the subsets "
        "overlap.)",
        "",
        "| mmr.seeds | subsets of the draws | same choice as all draws | choices (layers: subsets) |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["agreement"]:
        choices = "; ".join(f"{k}: {v}" for k, v in row["choices"].items())
        lines.append(f"| {row['seeds']} | {row['subsets']} | {row['same_as_all_draws']:.2f} | {choices} |")
    if result.get("boundary_flip"):
        pair = result["boundary_flip"][0]["layers"]
        lines += ["", f"The deciding pair, layers {pair[0]} (chosen) and {pair[1]}: the gap in standard errors of "
                  "the difference of their means with m seeds, and the chance m seeds rank them the other way "
                  "(normal approximation from the measured stds):", "",
                  "| mmr.seeds | z | flip probability |", "| --- | --- | --- |"]
        lines += [f"| {row['seeds']} | {row['z']:.2f} | {row['flip_probability']:.2g} |"
                  for row in result["boundary_flip"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = spread_config(args)
    from pipeline.chain import run_local
    from pipeline.stages import run_mmr
    from pipeline.reporting import ConsoleReporter

    root = Path(args.root)
    work = root / ".cache" / "work" / cfg.run_name
    folders = run_local(cfg, root, until="convert", work_root=work)
    parent = folders[checkpoint_name(cfg.schedule.counts[0])]
    mmr = dataclasses.replace(cfg.mmr, seeds=args.draws)
    out_dir = root / "spread" / f"{cfg.run_name}-draws{args.draws}"
    started = time.perf_counter()
    table = run_mmr(mmr, cfg.data.for_distillation(), cfg.hardware, cfg.seed, teacher=folders["teacher"], parent=parent,
                    out_dir=out_dir, work_dir=work / f"spread-draws{args.draws}", reporter=ConsoleReporter())
    seconds = time.perf_counter() - started
    chosen = cfg.schedule.counts[1] - cfg.schedule.counts[0] if len(cfg.schedule.counts) > 1 else 1
    record = {
        "settings": {"preset": args.experiment or "demo (RunConfig defaults)", "run_name": cfg.run_name,
                     "parent": parent.name, "draws": args.draws, "seed": cfg.seed, "steps": mmr.train.steps,
                     "batch_size": mmr.train.batch_size, "score_window": mmr.train.loss_window, "chosen": chosen,
                     "precision": cfg.hardware.precision, "device": cfg.hardware.device},
        "mmr_seconds": round(seconds, 1),
        "seconds_per_trial": seconds / (len(table["ranking"]) * args.draws),
        "mmr": table,
        "result": analyse(table, chosen),
        "environment": environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    shutil.copyfile(out_dir / "mmr.png", out.with_suffix(".png"))  # the stage's plot: means, spread, draws
    print(markdown(record))


if __name__ == "__main__":
    main()
