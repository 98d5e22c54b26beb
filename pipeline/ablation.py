"""The recipe's central choices, checked on one teacher: which data, which loss, which layer order.

From one teacher and its one LOO ranking (shared by every arm), for each seed of `ablation.seeds`:
- five first conversions to H-`schedule.counts[0]` (the same LOO-chosen layers, the same steps):
  reasoning traces / reverse KL (the recipe), generic text / reverse KL, an even mix / reverse KL,
  reasoning traces / forward KL, and reasoning traces / reverse KL + `ablation.ce_weight` x CE;
- from the recipe's H-first, the progressive steps over `schedule.counts[1:]` (same steps per
  conversion) three times: the next layers chosen by MMR (the recipe), by the teacher's static LOO
  ranking, and by KL-guided selection (`pipeline.stages.kl`);
- every final checkpoint (and the teacher once) scored by the `quality` stage.

Generic text: data.generic (a plain-text source), or with data.generic=teacher the teacher's own samples
(the `samples` stage, once, after the teacher): the generic and mix arms distil on its train split, and
every quality call scores its test split.

The seed is the distillation's (the Mamba mixers' initialisation, the order of the data, the MMR trials'),
never the teacher's or LOO's. Every stage call goes through the one executor, so arms that share a prefix
share its output (both orderings continue the recipe's H-first of the same seed) and a rerun with the same
store computes nothing. Store names: `<arm>-s<seed>-H-<K>`, `mmr-<checkpoint>`, `kl-<checkpoint>`,
`quality-<checkpoint>`.

`run_ablation` walks the calls (also for the plan); `collect_records` and `write_report` turn the stored
quality.json files into <ablation.report_name>-<device>.json / .md / .png. No Prefect or MLflow here
(flows/ablation.py; benchmarks/gpu_ablation.py runs it bare).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, checkpoint_name
from pipeline.executor import Output, Source, StageCall
from pipeline.recipe import (
    Distillation,
    convert_call,
    kl_call,
    kl_step_call,
    loo_call,
    loo_step_call,
    mmr_call,
    quality_call,
    samples_output,
    step_call,
    teacher_output,
)

RECORD_FIELDS = ("arm", "data", "loss", "ordering", "n_mamba", "seed", "tokens", "answer_accuracy", "nll_reasoning",
                 "nll_generic", "kl_to_teacher")
METRICS = ("answer_accuracy", "nll_reasoning", "nll_generic", "kl_to_teacher")
DISTILL_ON = {"reasoning": "distill", "generic": "generic", "mix": "mix"}  # arm data -> data.distill_on


@dataclass(frozen=True)
class Arm:
    name: str
    data: str  # reasoning | generic | mix
    loss: str  # reverse_kl | forward_kl (train.loss)
    ordering: str  # how the converted layers were chosen: loo (the first conversion's, always), mmr or kl
    continued: bool = False  # continues the recipe's H-first over schedule.counts[1:]
    claim: str = ""
    ce: bool = False  # adds ablation.ce_weight x CE to the loss (train.ce_weight)

    @property
    def loss_label(self) -> str:
        return f"{self.loss}+ce" if self.ce else self.loss


RECIPE = "reasoning-rkl"
ARMS = (
    Arm(RECIPE, "reasoning", "reverse_kl", "loo", claim="the recipe: reasoning traces, reverse KL"),
    Arm("generic-rkl", "generic", "reverse_kl", "loo", claim="generic text loses reasoning"),
    Arm("mix-rkl", "mix", "reverse_kl", "loo", claim="an even mix"),
    Arm("reasoning-fkl", "reasoning", "forward_kl", "loo", claim="reverse KL beats forward KL"),
    Arm("reasoning-rkl-ce", "reasoning", "reverse_kl", "loo", claim="reverse KL alone vs with a CE term", ce=True),
    Arm("reasoning-rkl-mmr", "reasoning", "reverse_kl", "mmr", continued=True,
        claim="past 50%: layers by MMR (the recipe)"),
    Arm("reasoning-rkl-loo", "reasoning", "reverse_kl", "loo", continued=True, claim="past 50%: layers by static LOO"),
    Arm("reasoning-rkl-kl", "reasoning", "reverse_kl", "kl", continued=True,
        claim="past 50%: layers by KL-guided selection"),
)
# (claim, arm, compared with): the differences the report states with their spread; the claim favours the
# first arm (the recipe's choice, or for KL-guided selection its paper's)
COMPARISONS = (
    ("reasoning traces vs generic text", RECIPE, "generic-rkl"),
    ("reasoning traces vs an even mix", RECIPE, "mix-rkl"),
    ("reverse KL vs forward KL", RECIPE, "reasoning-fkl"),
    ("reverse KL vs reverse KL + CE", RECIPE, "reasoning-rkl-ce"),
    ("MMR order vs LOO order past 50%", "reasoning-rkl-mmr", "reasoning-rkl-loo"),
    ("KL-guided order vs MMR order past 50%", "reasoning-rkl-kl", "reasoning-rkl-mmr"),
    ("KL-guided order vs LOO order past 50%", "reasoning-rkl-kl", "reasoning-rkl-loo"),
)
HIGHER_IS_BETTER = {"answer_accuracy": True, "kl_to_teacher": False, "nll_reasoning": False, "nll_generic": False}


def check_schedule(cfg: RunConfig) -> None:
    """The ablation needs a first count (H-first, ~50%) and at least one later one (~80%), and known arms."""
    unknown = sorted(set(cfg.ablation.arms) - {arm.name for arm in ARMS})
    if unknown:
        raise ConfigError(f"ablation.arms: unknown {unknown}; valid: {', '.join(arm.name for arm in ARMS)}")
    if len(cfg.schedule.counts) < 2:
        raise ConfigError(f"schedule.counts {list(cfg.schedule.counts)}: the ablation needs the first conversion "
                          "(about 50% Mamba) and at least one later count (about 80%), e.g. schedule.counts=[4,6]")
    if cfg.start.path:
        raise ConfigError(f"start.path={cfg.start.path}: the ablation converts the teacher itself; drop start.path")


def arm_name(arm: Arm, seed: int, count: int) -> str:
    return f"{arm.name}-s{seed}-{checkpoint_name(count)}"


@dataclass
class Result:
    """One arm and seed: its final checkpoint and the quality output that scored it."""

    arm: Arm | None  # None: the teacher (the reference line)
    seed: int | None
    checkpoint: Output
    quality: Output
    scorings: tuple[Output, ...] = ()  # the MMR or KL scorings on its path (their tokens are not distillation
    # tokens)


def run_ablation(cfg: RunConfig, execute: Callable[[StageCall], Output], teacher: Source | None) -> list[Result]:
    """Every stage call of the ablation, through `execute` (the executor, or the plan's walker). The MMR
    stages' worker processes (hardware.nproc > 1) serve every arm and are stopped when it ends."""
    from pipeline.stages.workers import shutdown

    try:
        return _walk(cfg, execute, teacher)
    finally:
        shutdown()


def arm_distillation(cfg: RunConfig, arm: Arm, seed: int) -> Distillation:
    """An arm's distillation: the run's, with the arm's loss (and CE term), data and seed; the seed also
    reaches the MMR and KL-guided trials. Mamba only: the arms compare data, loss and layer order, never
    mixers (schedule.mixers is the conversion chain's)."""
    train = dataclasses.replace(cfg.train, loss=arm.loss, seed=seed,
                                **({"ce_weight": cfg.ablation.ce_weight} if arm.ce else {}))
    return Distillation(train=train, first_train=dataclasses.replace(train, steps=cfg.first_train().steps),
                        data=dataclasses.replace(cfg.data, distill_on=DISTILL_ON[arm.data]).for_distillation(),
                        seed=seed,
                        mmr=dataclasses.replace(cfg.mmr, train=dataclasses.replace(cfg.mmr.train, seed=seed)))


def _walk(cfg: RunConfig, execute: Callable[[StageCall], Output], teacher: Source | None) -> list[Result]:
    check_schedule(cfg)
    counts = cfg.schedule.counts
    teacher_out = teacher_output(cfg, execute, teacher)  # the conversion chain's teacher (fine-tuned if asked)
    samples = samples_output(cfg, execute, teacher_out)  # the teacher's samples, or None
    # the conversion chain's LOO call: one ranking for every arm (and for `make pipeline`)
    loo = execute(loo_call(cfg, teacher_out))

    def quality(checkpoint: Output) -> Output:
        return execute(quality_call(cfg, teacher=teacher_out, checkpoint=checkpoint, generic=samples))

    results: list[Result] = []
    chosen = set(cfg.ablation.arms or [arm.name for arm in ARMS])
    needed = chosen | ({RECIPE} if any(arm.continued and arm.name in chosen for arm in ARMS) else set())
    for seed in cfg.ablation.seeds:
        firsts: dict[str, Output] = {}
        for arm in [arm for arm in ARMS if arm.name in needed]:
            distillation = arm_distillation(cfg, arm, seed)
            if not arm.continued:
                firsts[arm.name] = execute(convert_call(
                    cfg, distillation, teacher=teacher_out, loo=loo, name=arm_name(arm, seed, counts[0]),
                    generic=samples if arm.data in ("generic", "mix") else None))
                if arm.name in chosen:
                    results.append(Result(arm, seed, firsts[arm.name], quality(firsts[arm.name])))
                continue
            previous, scorings = firsts[RECIPE], []  # the continued arms read reasoning traces: no samples
            for count in counts[1:]:
                name = arm_name(arm, seed, count)
                if arm.ordering == "mmr":
                    scorings.append(execute(mmr_call(cfg, distillation, teacher=teacher_out, parent=previous)))
                    previous = execute(step_call(cfg, distillation, count, teacher=teacher_out, parent=previous,
                                                 mmr=scorings[-1], name=name))
                elif arm.ordering == "kl":  # the same trial settings as MMR's (see pipeline.stages.kl)
                    scorings.append(execute(kl_call(cfg, distillation, teacher=teacher_out, parent=previous)))
                    previous = execute(kl_step_call(cfg, distillation, count, teacher=teacher_out, parent=previous,
                                                    kl=scorings[-1], name=name))
                else:
                    previous = execute(loo_step_call(cfg, distillation, count, teacher=teacher_out, parent=previous,
                                                     loo=loo, name=name))
            results.append(Result(arm, seed, previous, quality(previous), tuple(scorings)))
    # the teacher's own scores, the reference line: last, so that concurrent runs start on their arms at once
    results.append(Result(None, None, teacher_out, quality(teacher_out)))
    return results


# --- records ---------------------------------------------------------------------------------------------

def read_quality(folder: Path) -> dict[str, Any]:
    from pipeline.stages.quality import QUALITY_FILE

    return json.loads((Path(folder) / QUALITY_FILE).read_text())


def mmr_sequences(folder: Path) -> int:
    """Sequences an MMR scoring trained on: its trials (each candidate's initialisations: mmr.seeds for a
    Mamba candidate, one for a Gated DeltaNet pair) x steps x batch size (each at most max_length tokens)."""
    from pipeline.stages.common import RUN_CONFIG
    from pipeline.stages.mmr import MMR_FILE

    table = json.loads((Path(folder) / MMR_FILE).read_text())
    settings = json.loads((Path(folder) / RUN_CONFIG).read_text())
    seeds = int(table.get("seeds", 1))
    trials = sum(len(entry["losses"]) if "losses" in entry else seeds for entry in table["ranking"])
    return trials * int(table["steps"]) * int(settings["mmr"]["train"]["batch_size"])


def kl_sequences(folder: Path) -> int:
    """Sequences a KL-guided scoring trained on: trials (candidates + the all-converted one) x steps x batch."""
    from pipeline.stages.common import RUN_CONFIG
    from pipeline.stages.kl import KL_FILE

    table = json.loads((Path(folder) / KL_FILE).read_text())
    settings = json.loads((Path(folder) / RUN_CONFIG).read_text())
    return int(table["trials"]) * int(table["steps"]) * int(settings["train"]["batch_size"])


SCORING_SEQUENCES = {"mmr": mmr_sequences, "kl": kl_sequences}  # ordering -> its scorings' sequences


def collect_records(results: Sequence[Result], folder_of: Callable[[Output], Path]) -> tuple[dict, list[dict]]:
    """(the teacher's quality, one record per arm and seed) from the stored outputs (`folder_of`: an
    output's local folder). Record fields: RECORD_FIELDS, then extras (checkpoint, layer pattern,
    kl_generic, and for the MMR and KL-guided arms the sequences their scorings trained on,
    `mmr_scoring_sequences` / `kl_scoring_sequences`)."""
    teacher, records = {}, []
    for result in results:
        scored = read_quality(folder_of(result.quality))
        if result.arm is None:
            teacher = scored
            continue
        arm = result.arm
        record = {"arm": arm.name, "data": arm.data, "loss": arm.loss_label, "ordering": arm.ordering,
                  "n_mamba": scored["n_mamba"], "seed": result.seed, "tokens": scored["tokens"],
                  **{name: scored[name] for name in METRICS},
                  "checkpoint": result.checkpoint.name, "layer_pattern": scored["layer_pattern"],
                  "kl_generic": scored["kl_generic"], "device": scored["device"]}
        if result.scorings:
            record[f"{arm.ordering}_scoring_sequences"] = sum(SCORING_SEQUENCES[arm.ordering](folder_of(output))
                                                              for output in result.scorings)
        records.append(record)
    return teacher, records


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per arm (in ARMS order): seeds, n_mamba, mean tokens, and mean and sample standard deviation of
    each metric across seeds (None with one seed)."""
    rows = []
    for arm in ARMS:
        mine = [record for record in records if record["arm"] == arm.name]
        if not mine:
            continue
        row = {"arm": arm.name, "data": arm.data, "loss": arm.loss_label, "ordering": arm.ordering,
               "n_mamba": mine[0]["n_mamba"], "seeds": sorted(record["seed"] for record in mine),
               "tokens": statistics.fmean(record["tokens"] for record in mine)}
        for name in METRICS:
            values = [float(record[name]) for record in mine]
            row[name] = statistics.fmean(values)
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        for field in ("mmr_scoring_sequences", "kl_scoring_sequences"):
            if any(field in record for record in mine):
                row[field] = statistics.fmean(record.get(field, 0) for record in mine)
        rows.append(row)
    return rows


def compare(summary: Sequence[Mapping[str, Any]], metric: str = "answer_accuracy") -> list[dict[str, Any]]:
    """Each claim's difference of means (arm minus the one it is compared with) and its spread: the standard
    error of the difference, sqrt(s_a^2/n_a + s_b^2/n_b) (None with fewer than two seeds on a side)."""
    by_arm = {row["arm"]: row for row in summary}
    out = []
    for claim, arm, other in COMPARISONS:
        if arm not in by_arm or other not in by_arm:
            continue
        a, b = by_arm[arm], by_arm[other]
        spread = None
        if a[f"{metric}_std"] is not None and b[f"{metric}_std"] is not None:
            spread = math.sqrt(a[f"{metric}_std"] ** 2 / len(a["seeds"]) + b[f"{metric}_std"] ** 2 / len(b["seeds"]))
        out.append({"claim": claim, "arm": arm, "versus": other, "metric": metric, "difference": a[metric] - b[metric],
                    "spread": spread})
    return out


def reading(row: Mapping[str, Any]) -> str:
    """A comparison in plain words: whether the claim (that its first arm is better on the metric) holds
    beyond two standard errors, is reversed beyond them, or is not resolved by the seeds run."""
    better = row["difference"] if HIGHER_IS_BETTER.get(row["metric"], True) else -row["difference"]
    verdict = ("holds" if better > 0 else "is reversed") if row["spread"] is not None and \
        abs(row["difference"]) > 2 * row["spread"] else None
    spread = "" if row["spread"] is None else f" ± {row['spread']:.4f}"
    same = ""
    if row.get("same_layers") is not None:
        same = (f" (the two converted the same layers on {row['same_layers']} of {row['seeds_compared']} seeds"
                + (": there the difference is run-to-run noise" if row["same_layers"] else "") + ")")
    if better == 0:
        return f"{row['claim']} ({row['metric']}): {row['arm']} and {row['versus']} are equal{same}."
    direction = "better" if better > 0 else "worse"
    if row["spread"] is None:
        verdict_text = "one seed on a side: no spread to judge it by"
    elif verdict is None:
        verdict_text = "not resolved (within 2 s.e.)"
    else:
        verdict_text = f"{verdict} (beyond 2 s.e.)"
    return (f"{row['claim']} ({row['metric']}): {row['arm']} is {direction} than {row['versus']} by "
            f"{abs(row['difference']):.4f}{spread}{same}: {verdict_text}.")


def same_layers(records: Sequence[Mapping[str, Any]], arm: str, other: str) -> tuple[int, int] | None:
    """(seeds on which two continued arms ended with the same layer pattern, seeds both ran), None unless both
    are orderings (continued arms): when they chose the same layers, their difference is training noise."""
    continued = {a.name for a in ARMS if a.continued}
    if arm not in continued or other not in continued:
        return None
    mine = {r["seed"]: r["layer_pattern"] for r in records if r["arm"] == arm}
    theirs = {r["seed"]: r["layer_pattern"] for r in records if r["arm"] == other}
    seeds = sorted(set(mine) & set(theirs))
    return sum(mine[seed] == theirs[seed] for seed in seeds), len(seeds)


# --- the report --------------------------------------------------------------------------------------------

def device_tag(device: str) -> str:
    """A file-name tag for a device name: "NVIDIA H200" -> "h200", "cpu" -> "cpu"."""
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device)
    text = model.group(1) if model else device
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _pm(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def summary_markdown(teacher: Mapping[str, Any], summary: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| arm | data | loss | ordering | Mamba layers | seeds | tokens | answer accuracy | NLL reasoning | "
             "NLL generic | KL to teacher |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if teacher:
        lines.append(f"| teacher | - | - | - | 0 | - | 0 | {teacher['answer_accuracy']:.3f} | "
                     f"{teacher['nll_reasoning']:.4f} | {teacher['nll_generic']:.4f} | 0 |")
    for row in summary:
        metrics = " | ".join(_pm(row[name], row[f"{name}_std"], 3 if name == "answer_accuracy" else 4)
                             for name in METRICS)
        lines.append(f"| {row['arm']} | {row['data']} | {row['loss']} | {row['ordering']} | {row['n_mamba']} | "
                     f"{len(row['seeds'])} | {row['tokens']:,.0f} | {metrics} |")
    return "\n".join(lines)


def comparison_markdown(comparisons: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| claim | arm − compared arm | metric | difference | spread (s.e.) | beyond 2 s.e.? |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in comparisons:
        spread = row["spread"]
        beyond = "-" if spread is None else ("yes" if abs(row["difference"]) > 2 * spread else "no")
        lines.append(f"| {row['claim']} | {row['arm']} − {row['versus']} | {row['metric']} | "
                     f"{row['difference']:+.4f} | {'-' if spread is None else f'{spread:.4f}'} | {beyond} |")
    return "\n".join(lines)


def ablation_plot(teacher: Mapping[str, Any], summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy and KL to the teacher per arm: mean across seeds, error bars one standard deviation,
    each seed a dot; the teacher's accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    labels = [f"{row['arm']}\nH-{row['n_mamba']}" for row in summary]
    for axis, metric, title in ((axes[0], "answer_accuracy", "answer accuracy (held-out problems)"),
                                (axes[1], "kl_to_teacher", "KL(student || teacher) per token")):
        means = [row[metric] for row in summary]
        errors = [row[f"{metric}_std"] or 0.0 for row in summary]
        axis.bar(range(len(summary)), means, yerr=errors, capsize=4,
                 color=["tab:orange" if row["arm"] == RECIPE else "tab:blue" for row in summary])
        for i, row in enumerate(summary):
            axis.scatter([i] * len(row["values"][metric]), row["values"][metric], color="black", s=10, zorder=3)
        if metric == "answer_accuracy" and teacher:
            axis.axhline(teacher["answer_accuracy"], color="tab:red", linestyle="--", label="teacher")
            axis.legend(fontsize=8)
        axis.set_xticks(range(len(summary)), labels, fontsize=7, rotation=25, ha="right")
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_settings(cfg: RunConfig) -> dict[str, Any]:
    """What the report states of the run's settings (the flow and the bare runner give the same)."""
    return {"layers": cfg.teacher.demo.num_hidden_layers if not cfg.teacher.path else cfg.teacher.path,
            "counts": list(cfg.schedule.counts), "steps": cfg.train.steps, "first_steps": cfg.first_train().steps,
            "batch_size": cfg.train.batch_size,
            "seeds": list(cfg.ablation.seeds), "mmr_max_length": cfg.mmr.train.max_length, "run_name": cfg.run_name,
            "mmr_steps": cfg.mmr.train.steps, "ce_weight": cfg.ablation.ce_weight,
            **({"generic": "teacher", "generic_train_rows": cfg.data.samples.train} if cfg.data.samples_teacher
               else {})}


def write_report(teacher: Mapping[str, Any], records: Sequence[Mapping[str, Any]], results_dir: str | Path, *,
                 command: str, date: str, settings: Mapping[str, Any], name: str = "ablation") -> dict[str, Path]:
    """<name>-<device>.json (records), .md (command, device, date, tables, a plain reading of each claim) and
    .png into `results_dir`; returns the paths. Same records, same files."""
    devices = sorted({record["device"] for record in records} | ({teacher["device"]} if teacher else set()))
    device = ", ".join(devices) or "unknown"
    tag = device_tag(devices[0]) if len(devices) == 1 else "mixed"
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"{name}-{tag}.{kind}" for kind in ("json", "md", "png")}
    summary = summarize(records)
    for row in summary:
        row["values"] = {name: [float(record[name]) for record in records if record["arm"] == row["arm"]]
                         for name in METRICS}
    comparisons = [row for pair in zip(compare(summary), compare(summary, "kl_to_teacher")) for row in pair]
    for row in comparisons:
        found = same_layers(records, row["arm"], row["versus"])
        if found is not None:
            row["same_layers"], row["seeds_compared"] = found
    ordered = sorted(records, key=lambda r: ([arm.name for arm in ARMS].index(r["arm"]), r["seed"]))
    paths["json"].write_text(json.dumps({"command": command, "device": device, "date": date, "settings": settings,
                                         "teacher": teacher, "records": ordered, "summary": summary,
                                         "comparisons": comparisons}, indent=2) + "\n")
    ablation_plot(teacher, summary, paths["png"])
    mmr = [row for row in summary if "mmr_scoring_sequences" in row]
    kl = [row for row in summary if "kl_scoring_sequences" in row]
    notes = [
        "Mean ± sample standard deviation across seeds (the seed is the distillation's: Mamba initialisation, "
        "data order, MMR trials; teacher and LOO ranking are shared by every arm). `tokens`: distillation tokens "
        "each checkpoint was trained on, summed over its lineage since the teacher (the continued arms include "
        "their H-first's).",
    ]
    if mmr:
        notes.append(f"Not in `tokens`: the MMR arm's scoring trials trained on {mmr[0]['mmr_scoring_sequences']:,.0f} "
                     f"sequences (candidates x steps x batch, each at most {settings.get('mmr_max_length')} tokens) "
                     "beside its distillation; the LOO-ordered arm needs none.")
    if kl:
        notes.append(f"Not in `tokens` either: the KL-guided arm's scoring trials trained on "
                     f"{kl[0]['kl_scoring_sequences']:,.0f} sequences (candidates + 1 all-converted trial, x steps "
                     "x batch; the MMR trials' settings).")
    if teacher and settings.get("generic") == "teacher":
        notes.append(f"Generic text: the teacher's own samples at temperature 1 (data.generic=teacher); the "
                     f"teacher's NLL on their test split is {teacher['nll_generic']:.4f} nats per token (the generic "
                     f"and mix arms distil on {settings.get('generic_train_rows')} rows of their train split, "
                     "sampled alike).")
    text = "\n".join([
        "# Ablation: which data, which loss, which layer order", "",
        f"- command: `{command}`", f"- device: {device}", f"- date: {date}",
        f"- teacher layers: {settings.get('layers')}; schedule.counts {settings.get('counts')}; "
        f"{settings.get('steps')} distillation steps per conversion, batch {settings.get('batch_size')}; "
        f"seeds {settings.get('seeds')}", "",
        summary_markdown(teacher, summary), "", *notes, "",
        "## Differences against their spread", "",
        comparison_markdown(comparisons), "",
        "Spread: the standard error of the difference of two means, sqrt(s_a²/n_a + s_b²/n_b); "
        "“beyond 2 s.e.” is a mechanical flag, not a test with a stated error rate.", "",
        "## Which claims hold", "",
        *[f"- {reading(row)}" for row in comparisons], "",
        f"![ablation]({paths['png'].name})", "",
    ])
    paths["md"].write_text(text)
    return paths


__all__ = ["ARMS", "COMPARISONS", "METRICS", "RECORD_FIELDS", "Arm", "Result", "arm_distillation", "arm_name",
           "check_schedule",
           "collect_records", "compare", "device_tag", "kl_sequences", "mmr_sequences", "read_quality", "reading",
           "report_settings", "run_ablation", "summarize", "summary_markdown", "write_report"]
