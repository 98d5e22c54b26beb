"""The one training loop: teacher pre-training, distillation, MMR trials and SFT all call `train`.

Notation: B = sequences per micro-batch, T = tokens per sequence, H = hidden size, V = vocabulary,
N = trained target tokens.

Objective (by `cfg.loss`): with a teacher, KL(student || teacher) or KL(teacher || student) on the trained
tokens' next-token distributions, plus `ce_weight` * CE when set; without a teacher, CE. Losses are the
mean over the trained tokens of the whole step (all `grad_accum` micro-batches together), so gradient
accumulation equals one large batch.

Precision (`precision`, the run's resolved `hardware.precision`): trainable parameters are always fp32
master weights (AdamW's state follows them); a student whose trainable parameters are in another dtype
is refused, because bf16 parameters lose most updates at the recipe's learning rates (an update below
half a bf16 ulp of the weight, 2^-9 of it, rounds away). "bf16-mixed" runs forward and backward under
bf16 autocast (on CUDA or CPU); the chunked losses form each chunk's logits with the autocast's bf16 head
GEMM and upcast them to fp32 before the softmax, the KL / CE and the gradient of the logits
(`pipeline.train.losses`). The head GEMM stays in bf16: in fp32 it moves no quality figure of the demo
chain and costs the 1B training benchmark about 30% of its throughput (benchmarks/results/gpu-pipeline-h200.md).
The frozen teacher may be held in any dtype (bf16 saves memory).

Processes: called in a process group (a worker under `torchrun`, any number of processes, one included),
the loop shards student and teacher with FSDP2 (a model already built sharded, `pipeline.convert.sharded`,
as it is), trains on this rank's share of each step and keeps its state through
`torch.distributed.checkpoint` (`pipeline.train.distributed`); bf16-mixed computes there
under the same autocast over fp32 parameters (no FSDP cast policy), so both paths compute alike.
Without a process group it is the plain single-process loop.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.train import distributed
from pipeline.train.batches import Batch, BatchSource, PreparedBatch, as_batch_source, prepare_batch
from pipeline.config.train import TRAIN_PRECISIONS, TRAJECTORY_FIELDS, TrainConfig
from pipeline.train.losses import chunked_cross_entropy, chunked_distill_loss
from pipeline.train.optim import TrainableFilter, build_optimizer, learning_rate_at, select_trainable
from pipeline.train.state import (
    capture_rng_state,
    latest_state,
    load_weights_and_optimizer,
    read_trainer_state,
    restore_rng_state,
    save_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMetrics:
    """What the callback receives every `log_every` steps (and at the run's last step)."""

    step: int  # optimiser steps done so far (1-based)
    loss: float  # this step's objective, mean over its trained tokens
    distill_loss: float | None  # the KL part (None without a teacher)
    ce_loss: float | None  # the CE part (None when not computed)
    lr: float  # learning rate this step used
    grad_norm: float  # global norm of the trainable gradients, before clipping
    tokens_per_second: float  # real (non-padding) input tokens per second of this step
    step_time_s: float
    tokens_seen: int  # real input tokens consumed over the whole run


@dataclass(frozen=True)
class TrainResult:
    """Where a `train` call left the run. Final losses average the last `cfg.loss_window` steps."""

    steps_done: int  # over the whole run, earlier calls included
    steps_this_call: int
    completed: bool  # steps_done == cfg.steps
    tokens_seen: int
    wall_time_s: float  # over the whole run
    final_loss: float  # NaN when no step has run
    final_distill_loss: float | None  # the MMR score of a trial run
    final_ce_loss: float | None
    state_path: Path | None  # the newest saved state, if a state_dir was given


MetricsCallback = Callable[[StepMetrics], None]


@dataclass(frozen=True)
class _Objective:
    distill_loss: str | None  # "reverse_kl" | "forward_kl" | None (CE only)
    temperature: float
    ce_weight: float  # 1.0 for pure CE; 0.0 = CE not computed


@dataclass(frozen=True)
class _Models:
    """What `train` set up for its steps: the models, their heads, the objective and the optimiser."""

    student: nn.Module
    teacher: nn.Module | None
    student_head: Tensor  # (V, H); a sharded student reads it again in each forward (`_loss_sums`)
    teacher_head: Tensor | None
    objective: _Objective
    optimizer: torch.optim.Optimizer
    trainable_params: list[nn.Parameter]
    device: torch.device
    precision: str  # "fp32" | "bf16-mixed"
    sharded: bool  # under a process group: FSDP2 modules, DCP state


@dataclass
class _Progress:
    step: int
    position: int  # micro-batches consumed
    tokens_seen: int
    wall_time_s: float  # before this call
    recent: deque[tuple[float, float | None, float | None]]  # (loss, distill, ce) of the last steps


def train(
    student: nn.Module,
    batches: BatchSource | Sequence[Batch] | Callable[[int], Iterable[Batch]],
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    callback: MetricsCallback | None = None,
    trainable_filter: TrainableFilter | None = None,
    max_steps_this_call: int | None = None,
    precision: str = "fp32",
) -> TrainResult:
    """Train `student` in place for `cfg.steps` optimiser steps (resuming from `state_dir` if it holds a state).

    `batches` yields micro-batches from a position (a `BatchSource`, a function of the position, or a list
    to cycle; see `pipeline.train.batches` for the batch convention). `teacher` (frozen,
    eval mode, no grad, same device) is required for the KL losses and refused for `loss="ce"`.
    `trainable_filter(name, param)` defines the Mamba parameters for `trainable="mamba"` when the student
    has no `mamba_parameters()`. State is saved every `cfg.save_every` steps and when the call ends;
    `max_steps_this_call` stops early (the state then lets the next call continue).
    The student's `requires_grad` flags and train/eval modes are restored on return.
    `precision`: "fp32" or "bf16-mixed" (see the module docstring).
    """
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"precision must be one of {TRAIN_PRECISIONS}, got {precision!r}")
    if max_steps_this_call is not None and max_steps_this_call < 0:
        raise ValueError(f"max_steps_this_call must be >= 0 or None, got {max_steps_this_call}")
    objective = _objective(cfg, teacher)
    source = as_batch_source(batches)
    device = _device_of(student, "student")
    if teacher is not None and (teacher_device := _device_of(teacher, "teacher")) != device:
        raise ValueError(f"teacher is on {teacher_device} but student is on {device}; put both on one device")
    student_head = _head_weight(student, "student")
    teacher_head = _head_weight(teacher, "teacher") if teacher is not None else None

    trainable = select_trainable(student, cfg.trainable, trainable_filter)
    not_fp32 = sorted({str(param.dtype) for _, param in trainable if param.dtype != torch.float32})
    if not_fp32:
        raise ValueError(
            f"trainable parameters must be float32 master weights, got {', '.join(not_fp32)}; load the student "
            "in float32 (precision='bf16-mixed' computes in bf16 under autocast while the weights stay fp32)"
        )
    trainable_ids = {id(param) for _, param in trainable}
    saved_flags = [(param, param.requires_grad) for param in student.parameters()]
    saved_modes = [(student, student.training)] + ([(teacher, teacher.training)] if teacher is not None else [])
    compiled: list[nn.Module] = []
    checkpointed: list[nn.Module] = []
    sharded = distributed.is_distributed()
    if not sharded and (distributed.is_sharded(student) or (teacher is not None and distributed.is_sharded(teacher))):
        raise ValueError("a model built sharded (fully_shard) needs its process group: this call has none")
    if cfg.cpu_offload and not sharded:
        raise ValueError("cpu_offload offloads FSDP's shards: it needs the torchrun path (a process group), "
                         "this is a plain single-process call")
    try:
        for param in student.parameters():
            param.requires_grad_(id(param) in trainable_ids)
        student.train()
        if teacher is not None:
            teacher.eval()
        if cfg.compile_blocks and device.type == "cuda":
            compiled = _compile_blocks(student, "student") + (
                _compile_blocks(teacher, "teacher") if teacher is not None else [])
        if cfg.activation_checkpointing:
            checkpointed = _checkpoint_blocks(student)
        if sharded:
            trainable_names = {name for name, _ in trainable}
            distributed.shard_models(student, teacher, cpu_offload=cfg.cpu_offload)  # sharded DTensors
            trainable = [(name, param) for name, param in student.named_parameters() if name in trainable_names]
        optimizer = build_optimizer(trainable, cfg)
        progress = _start(student, optimizer, cfg, state_dir, sharded=sharded)
        log.info(
            "training %d/%d parameters (%s) for steps %d..%d, loss=%s",
            sum(p.numel() for _, p in trainable),
            sum(p.numel() for p in student.parameters()),
            cfg.trainable,
            progress.step + 1,
            cfg.steps,
            cfg.loss,
        )
        models = _Models(student=student, teacher=teacher, student_head=student_head, teacher_head=teacher_head,
                         objective=objective, optimizer=optimizer, trainable_params=[param for _, param in trainable],
                         device=device, precision=precision, sharded=sharded)
        return _run(models, source, cfg, progress, state_dir=state_dir, callback=callback,
                    max_steps_this_call=max_steps_this_call)
    finally:
        for block in checkpointed:
            del block.forward  # the class's forward again
        for block in compiled:
            block._compiled_call_impl = None  # back to eager: what nn.Module.compile() set, unset
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        for module, mode in saved_modes:
            module.train(mode)


def _compile_blocks(model: nn.Module, name: str) -> list[nn.Module]:
    """torch.compile each block of `model.model.layers` in place (parameter names do not change, so
    checkpoints are unaffected); blocks of one kind share their compiled code."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"compile_blocks: the {name} has no model.layers list of decoder blocks to compile")
    for block in layers:
        block.compile()
    return list(layers)


def _checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """Activation checkpointing: each decoder block's forward recomputes its activations in the backward
    instead of keeping them (non-reentrant `torch.utils.checkpoint`). The block's own forward is wrapped,
    so parameter names do not change and FSDP's hooks stay outside the recomputed region."""
    from torch.utils.checkpoint import checkpoint

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("activation_checkpointing: the student has no model.layers list of decoder blocks")
    for block in layers:
        def checkpointed(*args, _forward=block.forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        block.forward = checkpointed
    return list(layers)


def _run(
    models: _Models,
    source: BatchSource,
    cfg: TrainConfig,
    progress: _Progress,
    *,
    state_dir: str | os.PathLike[str] | None,
    callback: MetricsCallback | None,
    max_steps_this_call: int | None,
) -> TrainResult:
    student, teacher, objective, optimizer = models.student, models.teacher, models.objective, models.optimizer
    device, sharded = models.device, models.sharded
    call_start = time.perf_counter()
    steps_left = cfg.steps - progress.step
    steps_this_call = steps_left if max_steps_this_call is None else min(steps_left, max_steps_this_call)
    bf16 = models.precision == "bf16-mixed"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    iterator: Iterator[Batch] = source.iter_from(progress.position)
    state_path = _latest(state_dir, sharded) if state_dir is not None else None
    rank, world = distributed.rank_and_world()
    saved_step = progress.step if state_path is not None else None

    def save() -> Path:
        assert state_dir is not None
        wall_time = progress.wall_time_s + time.perf_counter() - call_start
        trainer = _trainer_dict(progress, cfg, wall_time)
        save_function = distributed.save_distributed_state if sharded else save_state
        return save_function(state_dir, step=progress.step, model=student, optimizer=optimizer, trainer=trainer)

    for _ in range(steps_this_call):
        step_start = time.perf_counter()
        lr = learning_rate_at(progress.step, cfg)
        micro_batches = [_next_batch(iterator, progress.position + i, cfg, device) for i in range(cfg.grad_accum)]
        target_tokens = sum(int(batch.target_mask.sum()) for batch in micro_batches)  # N of the whole step
        if target_tokens == 0:
            raise ValueError(
                f"step {progress.step + 1} (micro-batches {progress.position}.."
                f"{progress.position + cfg.grad_accum - 1}) has no trained target tokens: "
                "every loss_mask is empty after the shift"
            )
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # (objective, distill, ce) summed over tokens
        for batch in distributed.step_share(micro_batches, rank, world) if sharded else micro_batches:
            with autocast():
                objective_sum, distill_sum, ce_sum = _loss_sums(
                    student, teacher, models.student_head, models.teacher_head, batch, objective, cfg.kl_chunk_tokens,
                    cfg.kl_chunk_elements, sharded=sharded,
                )
            # FSDP averages the ranks' gradients: each rank back-propagates its share of the step's sum times W
            share = objective_sum * world if sharded else objective_sum
            (share / target_tokens).backward()  # the step's mean, accumulated over micro-batches
            if sharded and teacher is not None:
                distributed.release(teacher)
            sums += torch.stack(
                [objective_sum.detach(), _or_zero(distill_sum, objective_sum), _or_zero(ce_sum, objective_sum)]
            ).double()
        grad_norm = torch.nn.utils.clip_grad_norm_(models.trainable_params, max_norm=max_norm)
        if sharded:
            sums, grad_norm = distributed.sum_over_ranks(sums), distributed.full_value(grad_norm)
        loss, distill, ce = (sums / target_tokens).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {progress.step + 1} (data position {progress.position})")
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        progress.step += 1
        progress.position += cfg.grad_accum
        step_tokens = sum(batch.input_tokens for batch in micro_batches)
        progress.tokens_seen += step_tokens
        record = (
            loss,
            distill if objective.distill_loss is not None else None,
            ce if objective.ce_weight > 0 else None,
        )
        progress.recent.append(record)
        step_time = time.perf_counter() - step_start

        if state_dir is not None and cfg.save_every and progress.step % cfg.save_every == 0:
            state_path, saved_step = save(), progress.step
        if callback is not None and (progress.step % cfg.log_every == 0 or progress.step == cfg.steps):
            callback(
                StepMetrics(
                    step=progress.step,
                    loss=loss,
                    distill_loss=record[1],
                    ce_loss=record[2],
                    lr=lr,
                    grad_norm=float(grad_norm),
                    tokens_per_second=step_tokens / step_time if step_time > 0 else math.inf,
                    step_time_s=step_time,
                    tokens_seen=progress.tokens_seen,
                )
            )

    if state_dir is not None and saved_step != progress.step:
        state_path = save()
    return TrainResult(
        steps_done=progress.step,
        steps_this_call=steps_this_call,
        completed=progress.step == cfg.steps,
        tokens_seen=progress.tokens_seen,
        wall_time_s=progress.wall_time_s + time.perf_counter() - call_start,
        final_loss=_mean([record[0] for record in progress.recent]),
        final_distill_loss=_mean_or_none([record[1] for record in progress.recent]),
        final_ce_loss=_mean_or_none([record[2] for record in progress.recent]),
        state_path=state_path,
    )


def _loss_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    student_head: Tensor,
    teacher_head: Tensor | None,
    batch: PreparedBatch,
    objective: _Objective,
    chunk_tokens: int,
    chunk_elements: int,
    sharded: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(objective, KL, CE) summed over the batch's trained tokens; position t predicts token t+1.

    `sharded`: the models are FSDP2 modules; their backbones run through the registered forward method and
    the lm_head weights are read after it, while gathered (see `pipeline.train.distributed`)."""
    if sharded:
        hidden = student.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]  # (B, T-1, H)
        student_head = _head_weight(student, "student")
    else:
        hidden = _hidden_states(student, batch)[:, :-1]  # (B, T-1, H)
    distill_sum = ce_sum = None
    if objective.distill_loss is not None:
        assert teacher is not None and teacher_head is not None
        with torch.no_grad():
            if sharded:
                teacher_hidden = teacher.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]
                teacher_head = _head_weight(teacher, "teacher")
            else:
                teacher_hidden = _hidden_states(teacher, batch)[:, :-1]  # (B, T-1, H)
        distill_sum = chunked_distill_loss(
            hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            batch.target_mask,
            kind=objective.distill_loss,
            temperature=objective.temperature,
            chunk_tokens=chunk_tokens,
            chunk_elements=chunk_elements,
            reduction="sum",
        )
    if objective.ce_weight > 0:
        targets = batch.input_ids[:, 1:]  # (B, T-1)
        ce_sum = chunked_cross_entropy(
            hidden, student_head, targets, batch.target_mask, chunk_tokens=chunk_tokens,
            chunk_elements=chunk_elements, reduction="sum",
        )
    if distill_sum is None:
        assert ce_sum is not None
        return ce_sum * objective.ce_weight, None, ce_sum
    if ce_sum is None:
        return distill_sum, distill_sum, None
    return distill_sum + objective.ce_weight * ce_sum, distill_sum, ce_sum


def _hidden_states(model: nn.Module, batch: PreparedBatch) -> Tensor:
    """Final hidden states (B, T, H) of the model's backbone (`model.model`, before the lm_head)."""
    output = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return output.last_hidden_state


def _objective(cfg: TrainConfig, teacher: nn.Module | None) -> _Objective:
    if cfg.is_distillation:
        if teacher is None:
            raise ValueError(f"loss={cfg.loss!r} distils from a teacher, but no teacher was given")
        return _Objective(distill_loss=cfg.loss, temperature=cfg.temperature, ce_weight=cfg.ce_weight)
    if teacher is not None:
        raise ValueError("loss='ce' trains on the data alone, but a teacher was given; use a KL loss to distil")
    return _Objective(distill_loss=None, temperature=1.0, ce_weight=1.0)


def _device_of(model: nn.Module, role: str) -> torch.device:
    """Where the model computes (a model built sharded: its mesh's device, wherever its shards live)."""
    try:
        next(model.parameters())
    except StopIteration:
        raise ValueError(f"{role} has no parameters") from None
    return distributed.compute_device(model)


def _head_weight(model: nn.Module, role: str) -> Tensor:
    """The lm_head weight (V, H); the chunked losses need a bias-free linear head."""
    if not isinstance(getattr(model, "model", None), nn.Module):
        raise ValueError(f"{role} ({type(model).__name__}) has no .model backbone returning last_hidden_state")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{role} ({type(model).__name__}) needs an nn.Linear lm_head, got {type(head).__name__}")
    if head.bias is not None:
        raise ValueError(f"{role} lm_head has a bias; the chunked losses support bias-free heads only")
    return head.weight


def _next_batch(iterator: Iterator[Batch], position: int, cfg: TrainConfig, device: torch.device) -> PreparedBatch:
    try:
        batch = next(iterator)
    except StopIteration:
        raise RuntimeError(
            f"batch source ran out at micro-batch {position}; the run needs steps * grad_accum = "
            f"{cfg.steps * cfg.grad_accum} micro-batches"
        ) from None
    return prepare_batch(
        batch, position=position, max_batch_size=cfg.batch_size, max_length=cfg.max_length, device=device
    )


def _latest(state_dir: str | os.PathLike[str], sharded: bool) -> Path | None:
    """The state to resume: a DCP state under a process group, a single-process state without; a state of
    the other kind alone is refused (one line), never silently ignored."""
    path = distributed.latest_distributed_state(state_dir) if sharded else latest_state(state_dir)
    other = latest_state(state_dir) if sharded else distributed.latest_distributed_state(state_dir)
    if path is None and other is not None:
        raise ValueError(
            f"{other} is a {'single-process' if sharded else 'distributed (torch.distributed.checkpoint)'} "
            f"training state; resume it with {'one process (hardware.nproc=1)' if sharded else 'torchrun (hardware.nproc >= 2)'}"
            " or use a fresh state_dir"
        )
    return path


def _start(
    student: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, state_dir: str | os.PathLike[str] | None,
    *, sharded: bool = False,
) -> _Progress:
    """Resume from the newest state in `state_dir`, or seed the RNGs for a fresh run."""
    path = _latest(state_dir, sharded) if state_dir is not None else None
    if path is None:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        return _Progress(step=0, position=0, tokens_seen=0, wall_time_s=0.0, recent=deque(maxlen=cfg.loss_window))
    trainer = distributed.read_distributed_trainer_state(path) if sharded else read_trainer_state(path)
    _check_same_trajectory(trainer["config"], cfg, path)  # before touching the student's weights
    if sharded:
        distributed.load_distributed_state(path, model=student, optimizer=optimizer)
    else:
        load_weights_and_optimizer(path, model=student, optimizer=optimizer)
    restore_rng_state(trainer["rng"])
    log.info("resuming from %s (step %d of %d)", path, trainer["step"], cfg.steps)
    recent = deque((tuple(record) for record in trainer["recent"]), maxlen=cfg.loss_window)
    return _Progress(
        step=trainer["step"],
        position=trainer["position"],
        tokens_seen=trainer["tokens_seen"],
        wall_time_s=trainer["wall_time_s"],
        recent=recent,  # type: ignore[arg-type]
    )


def _check_same_trajectory(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = asdict(cfg)
    for name in TRAJECTORY_FIELDS:
        before, now = saved.get(name), current[name]
        if isinstance(before, (list, tuple)):
            before, now = tuple(before), tuple(now)
        if before != now:
            raise ValueError(
                f"state {path} was saved with {name}={saved.get(name)!r} but the config now has "
                f"{name}={current[name]!r}; use a fresh state_dir or the original config"
            )


def _trainer_dict(progress: _Progress, cfg: TrainConfig, wall_time_s: float) -> dict[str, Any]:
    return {
        "step": progress.step,
        "position": progress.position,
        "tokens_seen": progress.tokens_seen,
        "wall_time_s": wall_time_s,
        "recent": [list(record) for record in progress.recent],
        "schedule": {"step": progress.step},  # the lr is a pure function of (step, config)
        "config": asdict(cfg),
        "rng": capture_rng_state(),
    }


def _or_zero(value: Tensor | None, like: Tensor) -> Tensor:
    return value.detach() if value is not None else torch.zeros_like(like)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return _mean(present) if present else None
