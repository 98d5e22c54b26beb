"""The layering rule the docs state: `pipeline/` imports no orchestration package (Prefect, MLflow, Hydra,
boto3) when its modules are imported, so it runs on a machine that has none of them (the GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "mlflow", "hydra", "omegaconf", "boto3", "botocore")

_PROBE = r"""
import importlib, pkgutil, sys
blocked = set(sys.argv[1].split(","))
# What the third-party libraries load on their own (accelerate imports boto3 where it is installed) is
# theirs, not the pipeline's: load them first and count only what the pipeline's modules add.
for library in ("torch", "safetensors", "transformers", "transformers.models.llama.modeling_llama",
                "accelerate", "datasets"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
before = {name for name in sys.modules if name.split(".")[0] in blocked}
import pipeline
for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    importlib.import_module(info.name)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in blocked and name not in before)
    if loaded:
        print(f"{info.name} imports {loaded[0]}")
        sys.exit(1)
"""


def test_no_pipeline_module_imports_an_orchestration_package():
    result = subprocess.run([sys.executable, "-c", _PROBE, ",".join(ORCHESTRATION)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_the_probe_catches_an_import():
    """The probe above is not vacuous: a package the pipeline imports itself (matplotlib, for the plots;
    no library loaded first imports it) is reported."""
    result = subprocess.run([sys.executable, "-c", _PROBE, "matplotlib"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1 and "imports matplotlib" in result.stdout, result.stdout + result.stderr[-2000:]


_WITHOUT_DATASETS = r"""
import importlib, pkgutil, sys
sys.modules["datasets"] = None  # any import of it now raises ImportError
import pipeline
for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    importlib.import_module(info.name)
"""


def test_every_pipeline_module_imports_without_datasets():
    """`datasets` is imported where rows are loaded (pipeline.data.loading), not when a module is: a GPU job
    that only tokenises, batches or measures runs on a machine without it."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_DATASETS], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


_LIGHT = r"""
import importlib, sys
module = sys.argv[1]
importlib.import_module(module)
heavy = sorted(name for name in sys.modules if name.split(".")[0] == "torch" or name.startswith("pipeline.stages"))
print(f"{module} imports {heavy[0]}" if heavy else "")
sys.exit(1 if heavy else 0)
"""


def test_the_floor_below_the_stages_imports_no_torch_and_no_stage():
    """The interfaces every layer names (the config, StageError, the Reporter) sit below the stages: importing
    them loads neither torch nor `pipeline.stages`."""
    for module in ("pipeline.config", "pipeline.errors", "pipeline.reporting", "pipeline.redaction"):
        result = subprocess.run([sys.executable, "-c", _LIGHT, module], cwd=REPO, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
