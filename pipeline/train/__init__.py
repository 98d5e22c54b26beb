"""The training loop every stage uses (teacher pre-training, distillation, MMR trials, SFT) and its losses.

Its settings, `TrainConfig`, live in `pipeline.config.train` (no torch there, so composing a config never
imports this package); they are re-exported here beside the loop that takes them.
"""

from pipeline.config.train import DISTILL_LOSSES, LOSS_CHOICES, TRAINABLE_CHOICES, TrainConfig
from pipeline.train.batches import (
    Batch,
    BatchFields,
    BatchSource,
    CallableBatchSource,
    ListBatchSource,
    PreparedBatch,
    as_batch_source,
    prepare_batch,
)
from pipeline.train.loop import MetricsCallback, StepMetrics, TrainResult, train
from pipeline.train.losses import (
    chunked_cross_entropy,
    chunked_distill_loss,
    reference_cross_entropy,
    reference_distill_loss,
)
from pipeline.train.optim import TrainableFilter, build_optimizer, learning_rate_at, select_trainable
from pipeline.train.state import latest_state

__all__ = [
    "DISTILL_LOSSES",
    "LOSS_CHOICES",
    "TRAINABLE_CHOICES",
    "TrainConfig",
    "Batch",
    "BatchFields",
    "BatchSource",
    "CallableBatchSource",
    "ListBatchSource",
    "PreparedBatch",
    "as_batch_source",
    "prepare_batch",
    "chunked_cross_entropy",
    "chunked_distill_loss",
    "reference_cross_entropy",
    "reference_distill_loss",
    "MetricsCallback",
    "StepMetrics",
    "TrainResult",
    "train",
    "TrainableFilter",
    "build_optimizer",
    "learning_rate_at",
    "select_trainable",
    "latest_state",
]
