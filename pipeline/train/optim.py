"""Trainable-parameter selection, AdamW parameter groups and the warm-up + cosine learning rate."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config.train import TrainConfig

TrainableFilter = Callable[[str, nn.Parameter], bool]


def select_trainable(
    model: nn.Module, trainable: str, trainable_filter: TrainableFilter | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs to train, in `model.named_parameters()` order.

    "all": every parameter. "mamba": the parameters `trainable_filter(name, param)` accepts, or else those
    the model yields from `mamba_parameters()` (the hybrid model's method; parameters or (name, parameter)
    pairs); an empty selection is an error.
    """
    named = list(model.named_parameters())
    if trainable == "all":
        if trainable_filter is not None:
            raise ValueError(
                "trainable_filter selects the Mamba parameters; it cannot be combined with trainable='all'"
            )
        return named
    if trainable != "mamba":
        raise ValueError(f"trainable must be 'mamba' or 'all', got {trainable!r}")
    if trainable_filter is not None:
        chosen = [(name, param) for name, param in named if trainable_filter(name, param)]
    elif callable(getattr(model, "mamba_parameters", None)):
        mamba_ids = {id(_as_parameter(item)) for item in model.mamba_parameters()}  # type: ignore[operator]
        chosen = [(name, param) for name, param in named if id(param) in mamba_ids]
    else:
        raise ValueError(
            f"trainable='mamba' needs a trainable_filter or a student with a mamba_parameters() method; "
            f"{type(model).__name__} has neither"
        )
    if not chosen:
        raise ValueError(f"trainable='mamba' selected no parameters of {type(model).__name__} (no Mamba mixers?)")
    return chosen


def _as_parameter(item: object) -> nn.Parameter:
    """A parameter from `mamba_parameters()`, which may yield parameters or (name, parameter) pairs."""
    parameter = item[1] if isinstance(item, tuple) and len(item) == 2 else item
    if not isinstance(parameter, nn.Parameter):
        raise TypeError(f"mamba_parameters() must yield parameters or (name, parameter) pairs, got {item!r:.80}")
    return parameter


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: not to biases, norm scales (1-D) or `_no_weight_decay` params."""
    return param.dim() >= 2 and not getattr(param, "_no_weight_decay", False)


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over two groups, with and without weight decay (empty groups left out)."""
    with_decay = [param for name, param in named_params if decays(name, param)]
    without_decay = [param for name, param in named_params if not decays(name, param)]
    groups = [
        {"params": params, "weight_decay": weight_decay}
        for params, weight_decay in ((with_decay, cfg.weight_decay), (without_decay, 0.0))
        if params
    ]
    # One fused kernel per parameter group on CUDA instead of a dozen multi-tensor passes over the
    # parameters, gradients and both moments; the CPU keeps the default (foreach) implementation.
    fused = bool(named_params) and all(param.is_cuda for _, param in named_params)
    return torch.optim.AdamW(groups, lr=learning_rate_at(0, cfg), betas=cfg.betas, fused=fused or None)


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimiser step `step`: linear warm-up to `lr`, then cosine to `min_lr`.

    Warm-up steps 0..W-1 use lr * (step + 1) / W; steps W..S-1 follow
    min_lr + (lr - min_lr) * (1 + cos(pi * (step - W) / (S - 1 - W))) / 2, so the last step uses min_lr.
    The schedule is a pure function of the step, so the saved step is all its state.
    """
    if not 0 <= step < cfg.steps:
        raise ValueError(f"step must be in [0, steps={cfg.steps}), got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.steps - 1 - cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / decay_steps if decay_steps > 0 else 0.0
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
