"""Quality metrics, throughput measurement and plots."""

from pipeline.evaluate.plots import bar_plot, frontier_plot
from pipeline.evaluate.quality import answer_accuracy, nll_and_kl
from pipeline.evaluate.throughput import Throughput, generation_throughput

__all__ = ["Throughput", "answer_accuracy", "bar_plot", "frontier_plot", "generation_throughput", "nll_and_kl"]
