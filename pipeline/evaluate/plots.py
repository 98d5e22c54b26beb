"""PNG plots: LOO importance, MMR losses, the efficiency frontier (throughput ratio vs accuracy), and
accuracy and throughput against cumulative training tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bar_plot(values: Sequence[float], labels: Sequence[str], *, title: str, ylabel: str, path: str | Path,
             highlight: Sequence[int] = (), errors: Sequence[float] | None = None,
             points: Sequence[Sequence[float]] | None = None) -> Path:
    """One bar per value; `errors`: +- error bars (a spread); `points`: the values each bar summarises,
    drawn as dots over it."""
    figure, axis = plt.subplots(figsize=(max(4.0, 0.45 * len(values) + 2), 3.2))
    colors = ["tab:orange" if i in set(highlight) else "tab:blue" for i in range(len(values))]
    axis.bar(range(len(values)), values, color=colors, yerr=errors, capsize=4 if errors is not None else 0)
    for i, group in enumerate(points or ()):
        axis.scatter([i] * len(group), group, color="black", s=10, zorder=3)
    axis.set_xticks(range(len(values)), labels, rotation=0 if len(values) < 20 else 90)
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def grouped_bar_plot(series: dict[str, Sequence[float | None]], labels: Sequence[str], *, title: str, ylabel: str,
                     path: str | Path, errors: dict[str, Sequence[float | None]] | None = None) -> Path:
    """Side-by-side bars, one series a colour (e.g. one MMR score per mixer at each layer); None = no bar.
    `errors`: +- error bars per series, as `series` is laid out (None = no error bar on that bar)."""
    figure, axis = plt.subplots(figsize=(max(4.0, 0.3 * len(labels) * len(series) + 2), 3.2))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        kept = [i for i, v in enumerate(values) if v is not None]
        positions = [i + (index - (len(series) - 1) / 2) * width for i in kept]
        spread = None  # a series without any error (e.g. a mixer scored once) gets no error bars
        if errors is not None and any(errors[name][i] is not None for i in kept):
            spread = [errors[name][i] or 0.0 for i in kept]
        axis.bar(positions, [values[i] for i in kept], width=width, label=name, yerr=spread,
                 capsize=3 if spread is not None else 0)
    axis.set_xticks(range(len(labels)), labels, rotation=0 if len(labels) < 20 else 90)
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def frontier_plot(records: Sequence[dict], path: str | Path, *, quality_key: str = "answer_accuracy") -> Path:
    """One point per checkpoint: throughput ratio to the teacher (x) against answer accuracy (y)."""
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for record in records:
        x, y = record["throughput_ratio"], record[quality_key]
        axis.scatter([x], [y], s=40, color=_color(record))
        axis.annotate(record["checkpoint"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.set_xlabel("throughput / teacher throughput")
    axis.set_ylabel(quality_key.replace("_", " "))
    axis.set_title("efficiency frontier")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def tokens_frontier_plot(records: Sequence[dict], path: str | Path, *,
                         quality_key: str = "answer_accuracy") -> Path:
    """The recipe's frontier against cost: answer accuracy (left) and throughput ratio to the teacher
    (right) of every checkpoint against the tokens trained on since the teacher (`cumulative_train_tokens`);
    the teacher sits at 0."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((axes[0], quality_key, quality_key.replace("_", " ")),
                             (axes[1], "throughput_ratio", "throughput / teacher throughput")):
        for record in records:
            x, y = record.get("cumulative_train_tokens", 0), record[key]
            axis.scatter([x], [y], s=40, color=_color(record))
            axis.annotate(record["checkpoint"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        axis.set_xlabel("cumulative training tokens")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle("checkpoints against training tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _color(record: dict) -> str:
    """The teacher red, hybrids blue (green where they hold Gated DeltaNet layers)."""
    if record["n_mamba"] + record.get("n_gdn", 0) == 0:
        return "tab:red"
    return "tab:green" if record.get("n_gdn") else "tab:blue"


__all__ = ["bar_plot", "frontier_plot", "grouped_bar_plot", "tokens_frontier_plot"]
