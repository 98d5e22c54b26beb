"""The recipe's stages as plain functions over checkpoint folders (no Prefect, store or MLflow needed)."""

from pipeline.errors import StageError
from pipeline.reporting import ConsoleReporter, Reporter
from pipeline.stages.convert import run_convert, run_loo_step, run_step
from pipeline.stages.evaluate import run_evaluate, summary_table
from pipeline.stages.kl import run_kl, run_kl_step
from pipeline.stages.loo import run_loo
from pipeline.stages.mmr import run_mmr
from pipeline.stages.quality import run_quality
from pipeline.stages.samples import run_samples
from pipeline.stages.sft import run_sft, run_teacher_finetune
from pipeline.stages.start import import_start
from pipeline.stages.teacher import import_teacher, run_teacher

__all__ = [
    "ConsoleReporter",
    "Reporter",
    "StageError",
    "import_start",
    "import_teacher",
    "run_convert",
    "run_evaluate",
    "run_kl",
    "run_kl_step",
    "run_loo",
    "run_loo_step",
    "run_mmr",
    "run_quality",
    "run_samples",
    "run_sft",
    "run_teacher_finetune",
    "run_step",
    "run_teacher",
    "summary_table",
]
