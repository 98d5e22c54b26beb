"""`pipeline.config.train` under its old name (the training loop's configuration lives in `pipeline.config`)."""

from pipeline.config.train import (  # noqa: F401
    DISTILL_LOSSES,
    LOSS_CHOICES,
    SAVE_DTYPES,
    TRAIN_PRECISIONS,
    TRAINABLE_CHOICES,
    TRAJECTORY_FIELDS,
    TrainConfig,
)
