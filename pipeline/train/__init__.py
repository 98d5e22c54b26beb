"""The training loop every stage uses (teacher pre-training, distillation, MMR trials, SFT) and its losses.

`TrainConfig` imports no torch; the rest loads on first use, so configuration code (Hydra composition,
`--help`) stays light.
"""

from importlib import import_module
from typing import Any

from pipeline.config.train import DISTILL_LOSSES, LOSS_CHOICES, TRAINABLE_CHOICES, TrainConfig

_LAZY = {
    "Batch": "batches",
    "BatchFields": "batches",
    "BatchSource": "batches",
    "CallableBatchSource": "batches",
    "ListBatchSource": "batches",
    "PreparedBatch": "batches",
    "as_batch_source": "batches",
    "prepare_batch": "batches",
    "chunked_cross_entropy": "losses",
    "chunked_distill_loss": "losses",
    "reference_cross_entropy": "losses",
    "reference_distill_loss": "losses",
    "MetricsCallback": "loop",
    "StepMetrics": "loop",
    "TrainResult": "loop",
    "train": "loop",
    "TrainableFilter": "optim",
    "build_optimizer": "optim",
    "learning_rate_at": "optim",
    "select_trainable": "optim",
    "latest_state": "state",
}

__all__ = ["DISTILL_LOSSES", "LOSS_CHOICES", "TRAINABLE_CHOICES", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.train' has no attribute {name!r}")
    value = getattr(import_module(f"pipeline.train.{module}"), name)
    globals()[name] = value
    return value
