"""Typed configuration of the training loop (imports no torch: it becomes a Hydra structured config).

Field choices that are strings (`trainable`, `loss`) are plain `str` fields checked in `__post_init__`,
because OmegaConf structured configs do not accept `typing.Literal`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRAINABLE_CHOICES: tuple[str, ...] = ("mamba", "all")
LOSS_CHOICES: tuple[str, ...] = ("reverse_kl", "forward_kl", "ce")
DISTILL_LOSSES: tuple[str, ...] = ("reverse_kl", "forward_kl")
SAVE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# How a training step computes (`hardware.precision`, resolved): "fp32", or "bf16-mixed" = fp32 master
# weights and AdamW state, forward and backward under bf16 autocast, losses from fp32 logits.
TRAIN_PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed")

# Fields that change the training trajectory: a resumed run must use the values it was saved with.
TRAJECTORY_FIELDS: tuple[str, ...] = (
    "steps",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "grad_clip",
    "grad_accum",
    "batch_size",
    "max_length",
    "seed",
    "trainable",
    "loss",
    "temperature",
    "ce_weight",
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"TrainConfig.{message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(name: str, value: object, minimum: int) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an int >= {minimum}, got {value!r}",
    )


@dataclass
class TrainConfig:
    """One training run: teacher pre-training, distillation, an MMR trial, or SFT.

    A step is one optimiser update over `grad_accum` micro-batches of at most `batch_size` sequences of
    at most `max_length` tokens. The learning rate warms up linearly over `warmup_steps`, then follows a
    cosine from `lr` down to `lr * min_lr_ratio` at the last step.
    """

    steps: int = 1000  # optimiser steps in the whole run (over all resumed calls)
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate = lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.01  # AdamW; never applied to biases, norms or `_no_weight_decay` params
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    grad_accum: int = 1  # micro-batches per optimiser step
    batch_size: int = 8  # sequences per micro-batch (a batch may hold fewer, never more)
    max_length: int = 1024  # tokens per sequence (a batch may be shorter, never longer)
    seed: int = 0  # seeds torch / python / numpy at the start of a fresh run
    trainable: str = "mamba"  # "mamba": only Mamba mixer parameters; "all": every parameter
    loss: str = "reverse_kl"  # "reverse_kl" | "forward_kl" (need a teacher) | "ce" (no teacher)
    temperature: float = 1.0  # softmax temperature of both KL distributions
    ce_weight: float = 0.0  # distillation only: loss = KL + ce_weight * CE on the trained tokens
    kl_chunk_tokens: int = 1024  # at most this many tokens per chunk when losses go through the lm_head
    kl_chunk_elements: int = 2**25  # and at most this many logits per chunk (a 128 MiB fp32 block): the
    # chunk's memory is then the same for any vocabulary size
    save_every: int = 0  # save resumable state every this many steps; 0 = only when a call ends
    log_every: int = 10  # report metrics to the callback every this many steps (and at the last)
    # dtype of the saved checkpoint's floating-point weights ("float32" | "bfloat16"); training always keeps
    # fp32 master weights, whatever the run's precision (`hardware.precision`, passed to `train`)
    save_dtype: str = "float32"
    compile_blocks: bool = False  # CUDA: torch.compile each decoder block of student and teacher (fuses norms,
    # residual adds, RoPE and activations; the first steps pay the compile time). CPU ignores it.
    loss_window: int = 10  # TrainResult.final_loss = mean loss of the last this many steps
    # recompute each student block's activations in the backward instead of keeping them (less memory, about
    # a third more compute); the trajectory is the same
    activation_checkpointing: bool = field(default=False, metadata={"key_neutral": True})  # (pipeline.config.KEY_NEUTRAL)
    # FSDP path only (under torchrun): the student's sharded fp32 parameters, gradients and AdamW state live
    # in CPU memory and AdamW steps there (FSDP2's CPUOffloadPolicy): less GPU memory, slower steps; the
    # same arithmetic up to the CPU AdamW's rounding (noise), hence key-neutral
    cpu_offload: bool = field(default=False, metadata={"key_neutral": True})
    # FSDP path only: how the trained model leaves the ranks. False: gathered, one tensor at a time, through
    # rank 0, which writes the checkpoint; True: every rank writes its own shards (torch.distributed.checkpoint)
    # and the stage's process turns them into the checkpoint, one tensor at a time. The checkpoint is the same
    # file for file, hence key-neutral.
    save_sharded: bool = field(default=False, metadata={"key_neutral": True})

    def __post_init__(self) -> None:
        _require_int("steps", self.steps, 1)
        _require(_is_number(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _require(
            _is_number(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0,
            f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}",
        )
        _require(
            _is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps,
            f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0, got {self.weight_decay!r}",
        )
        # OmegaConf hands tuples back as lists: normalise so configs compare equal after a round trip.
        _require(
            isinstance(self.betas, (tuple, list))
            and len(self.betas) == 2
            and all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas!r}",
        )
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _require(
            self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
            f"grad_clip must be > 0 or None, got {self.grad_clip!r}",
        )
        _require_int("grad_accum", self.grad_accum, 1)
        _require_int("batch_size", self.batch_size, 1)
        _require(
            _is_int(self.max_length) and self.max_length >= 2,
            f"max_length must be an int >= 2 (one input and one target token), got {self.max_length!r}",
        )
        _require(
            _is_int(self.seed) and 0 <= self.seed < 2**32,
            f"seed must be an int in [0, 2**32) (numpy's range), got {self.seed!r}",
        )
        _require(
            self.trainable in TRAINABLE_CHOICES,
            f"trainable must be one of {TRAINABLE_CHOICES}, got {self.trainable!r}",
        )
        _require(self.loss in LOSS_CHOICES, f"loss must be one of {LOSS_CHOICES}, got {self.loss!r}")
        _require(
            _is_number(self.temperature) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature!r}",
        )
        _require(
            self.loss != "ce" or self.temperature == 1.0,
            f"temperature applies to the KL losses only; loss='ce' needs temperature=1.0, got {self.temperature!r}",
        )
        _require(_is_number(self.ce_weight) and self.ce_weight >= 0, f"ce_weight must be >= 0, got {self.ce_weight!r}")
        _require(
            self.loss != "ce" or self.ce_weight == 0.0,
            f"ce_weight mixes CE into a KL loss; with loss='ce' it must be 0, got {self.ce_weight!r}",
        )
        _require_int("kl_chunk_tokens", self.kl_chunk_tokens, 1)
        _require_int("kl_chunk_elements", self.kl_chunk_elements, 1)
        _require_int("save_every", self.save_every, 0)
        _require_int("log_every", self.log_every, 1)
        _require(self.save_dtype in SAVE_DTYPES, f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        _require(isinstance(self.compile_blocks, bool), f"compile_blocks must be a bool, got {self.compile_blocks!r}")
        _require_int("loss_window", self.loss_window, 1)
        _require(isinstance(self.activation_checkpointing, bool),
                 f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}")
        _require(isinstance(self.cpu_offload, bool), f"cpu_offload must be a bool, got {self.cpu_offload!r}")
        _require(isinstance(self.save_sharded, bool), f"save_sharded must be a bool, got {self.save_sharded!r}")

    @property
    def is_distillation(self) -> bool:
        """True when the objective is a KL to a teacher (a teacher must be given to `train`)."""
        return self.loss in DISTILL_LOSSES

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio
