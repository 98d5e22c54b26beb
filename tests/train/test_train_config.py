"""TrainConfig: defaults, validation messages, Hydra/OmegaConf round trip, no torch import."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.config.train import TrainConfig

CONFIG_FILE = Path(__file__).resolve().parents[2] / "pipeline" / "config" / "train.py"


def test_defaults_are_valid_and_distil_with_reverse_kl() -> None:
    cfg = TrainConfig()
    assert cfg.loss == "reverse_kl" and cfg.temperature == 1.0 and cfg.trainable == "mamba"
    assert cfg.is_distillation
    assert cfg.min_lr == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert not TrainConfig(loss="ce").is_distillation


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"steps": 2.5}, "steps must be an int >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in [0, 1]"),
        ({"steps": 10, "warmup_steps": 11}, "warmup_steps must be an int in [0, steps=10]"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"betas": (0.9,)}, "betas must be two numbers in [0, 1)"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1)"),
        ({"grad_clip": 0.0}, "grad_clip must be > 0 or None"),
        ({"grad_accum": 0}, "grad_accum must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"max_length": 1}, "max_length must be an int >= 2"),
        ({"seed": -1}, "seed must be an int in [0, 2**32)"),
        ({"trainable": "attention"}, "trainable must be one of ('mamba', 'all')"),
        ({"loss": "kl"}, "loss must be one of ('reverse_kl', 'forward_kl', 'ce')"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"loss": "ce", "temperature": 2.0}, "loss='ce' needs temperature=1.0"),
        ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
        ({"loss": "ce", "ce_weight": 0.5}, "with loss='ce' it must be 0"),
        ({"kl_chunk_tokens": 0}, "kl_chunk_tokens must be an int >= 1"),
        ({"kl_chunk_elements": 0}, "kl_chunk_elements must be an int >= 1"),
        ({"save_every": -1}, "save_every must be an int >= 0"),
        ({"log_every": 0}, "log_every must be an int >= 1"),
        ({"save_dtype": "float16"}, "save_dtype must be one of ('float32', 'bfloat16')"),
        ({"compile_blocks": "yes"}, "compile_blocks must be a bool"),
        ({"loss_window": 0}, "loss_window must be an int >= 1"),
    ],
)
def test_invalid_values_raise_one_clear_error(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as error:
        TrainConfig(**overrides)
    message = str(error.value)
    assert message.startswith("TrainConfig.") and fragment in message and "\n" not in message


def test_structured_config_round_trip() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(TrainConfig)
    overrides = omegaconf.OmegaConf.from_dotlist(["steps=100", "betas=[0.8,0.9]", "loss=forward_kl"])
    merged = omegaconf.OmegaConf.merge(schema, overrides)
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, TrainConfig)
    assert cfg.steps == 100 and cfg.loss == "forward_kl"
    assert cfg.betas == (0.8, 0.9)  # lists from OmegaConf come back as tuples
    assert asdict(cfg) == asdict(TrainConfig(steps=100, betas=(0.8, 0.9), loss="forward_kl"))
    with pytest.raises(ValueError, match="TrainConfig.loss must be one of"):
        omegaconf.OmegaConf.to_object(omegaconf.OmegaConf.merge(schema, {"loss": "kl"}))


def test_config_module_imports_no_torch() -> None:
    # Load the file on its own (no package __init__ runs).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('train_config', {str(CONFIG_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['train_config'] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.TrainConfig(steps=5)\n"
        "assert 'torch' not in sys.modules, 'config.py imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
