"""The training loop every stage uses (teacher pre-training, distillation, MMR trials, SFT) and its losses."""

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
from pipeline.train.config import DISTILL_LOSSES, LOSS_CHOICES, TRAINABLE_CHOICES, TrainConfig
from pipeline.train.losses import (
    chunked_cross_entropy,
    chunked_distill_loss,
    reference_cross_entropy,
    reference_distill_loss,
)
from pipeline.train.loop import MetricsCallback, StepMetrics, TrainResult, train
from pipeline.train.optim import TrainableFilter, build_optimizer, learning_rate_at, select_trainable
from pipeline.train.state import latest_state

__all__ = [
    "DISTILL_LOSSES",
    "LOSS_CHOICES",
    "TRAINABLE_CHOICES",
    "Batch",
    "BatchFields",
    "BatchSource",
    "CallableBatchSource",
    "ListBatchSource",
    "MetricsCallback",
    "PreparedBatch",
    "StepMetrics",
    "TrainConfig",
    "TrainResult",
    "TrainableFilter",
    "as_batch_source",
    "build_optimizer",
    "chunked_cross_entropy",
    "chunked_distill_loss",
    "latest_state",
    "learning_rate_at",
    "prepare_batch",
    "reference_cross_entropy",
    "reference_distill_loss",
    "select_trainable",
    "train",
]
