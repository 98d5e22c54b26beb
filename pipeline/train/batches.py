"""What the training loop reads: a resumable source of micro-batches, and the batch convention.

Batch convention (a mapping of tensors, or an object with these attributes such as
`pipeline.data.batching.Batch`; B = sequences, T = tokens):
- `input_ids` (B, T) int64, required.
- `attention_mask` (B, T) 0/1, optional (default all ones); 0 marks padding.
- `loss_mask` (B, T) bool or 0/1, optional (default = attention_mask): `loss_mask[b, t] = 1` marks token t
  as a trained TARGET, i.e. the prediction of token t made at position t - 1 is in the loss (for SFT:
  the assistant tokens). `loss_mask[:, 0]` is never used (nothing predicts the first token). A target
  also needs both its own position and the predicting position to be real tokens (attention_mask = 1).
`labels` with -100 is NOT read: a batch that carries `labels` without `loss_mask` is rejected, so the two
conventions never mix silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Protocol, TypeAlias, runtime_checkable

import torch
from torch import Tensor


class BatchFields(Protocol):
    """A batch given as an object: `input_ids` is required, the masks may be None or absent."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor | None  # (B, T)
    loss_mask: Tensor | None  # (B, T)


Batch: TypeAlias = Mapping[str, Tensor] | BatchFields


@runtime_checkable
class BatchSource(Protocol):
    """A deterministic, resumable sequence of micro-batches.

    `iter_from(position)` yields the micro-batches that follow the first `position` ones, where
    `position` counts micro-batches already consumed; the same source (same data and seed) must yield
    the same batches for the same position, so a resumed run sees exactly what an uninterrupted one saw.
    It should not run out before the run's `steps * grad_accum` micro-batches (cycle over epochs).
    """

    def iter_from(self, position: int) -> Iterator[Batch]: ...


class ListBatchSource:
    """A `BatchSource` over an in-memory list of batches, repeated in order when `cycle` is True."""

    def __init__(self, batches: Sequence[Batch], *, cycle: bool = True) -> None:
        if len(batches) == 0:
            raise ValueError("ListBatchSource needs at least one batch, got an empty sequence")
        self.batches = list(batches)
        self.cycle = cycle

    def iter_from(self, position: int) -> Iterator[Batch]:
        if position < 0:
            raise ValueError(f"batch position must be >= 0, got {position}")
        if not self.cycle:
            yield from self.batches[position:]
            return
        for index in count(position):
            yield self.batches[index % len(self.batches)]


class CallableBatchSource:
    """A `BatchSource` over a function `position -> iterable of micro-batches`."""

    def __init__(self, batches_from: Callable[[int], Iterable[Batch]]) -> None:
        self.batches_from = batches_from

    def iter_from(self, position: int) -> Iterator[Batch]:
        return iter(self.batches_from(position))


def as_batch_source(batches: BatchSource | Sequence[Batch] | Callable[[int], Iterable[Batch]]) -> BatchSource:
    """A `BatchSource` as is; a sequence of batches as a cycling `ListBatchSource`; a function of the position."""
    if isinstance(batches, BatchSource):
        return batches
    if isinstance(batches, Sequence):
        return ListBatchSource(batches)
    if callable(batches):
        return CallableBatchSource(batches)
    raise TypeError(
        "batches must be a BatchSource (with iter_from(position)), a sequence of batch dicts or a function "
        f"position -> batches, got {type(batches).__name__}"
    )


@dataclass(frozen=True)
class PreparedBatch:
    """A validated micro-batch on the training device, with the shifted target mask."""

    input_ids: Tensor  # (B, T) int64
    attention_mask: Tensor  # (B, T) int64 0/1
    target_mask: Tensor  # (B, T-1) bool: position t is trained to predict token t+1
    input_tokens: int  # real (non-padding) tokens, for throughput


def prepare_batch(
    batch: Batch, *, position: int, max_batch_size: int, max_length: int, device: torch.device
) -> PreparedBatch:
    """Check a micro-batch against the convention above and move it to `device`."""
    where = f"micro-batch at position {position}"
    input_ids = _field(batch, "input_ids")
    if input_ids is None:
        raise ValueError(f"{where} ({type(batch).__name__}) has no 'input_ids'")
    if _field(batch, "labels") is not None and _field(batch, "loss_mask") is None:
        raise ValueError(
            f"{where} has 'labels' but no 'loss_mask'; the loop trains on loss_mask (see pipeline.train.batches)"
        )
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"{where}: input_ids must be an int64 tensor of shape (batch, tokens), got {_describe(input_ids)}"
        )
    size, length = input_ids.shape
    if size > max_batch_size:
        raise ValueError(f"{where} has {size} sequences, more than batch_size={max_batch_size}")
    if length > max_length:
        raise ValueError(f"{where} has {length} tokens per sequence, more than max_length={max_length}")
    if length < 2:
        raise ValueError(f"{where} has {length} token(s) per sequence; next-token training needs at least 2")
    attention_mask = _optional_mask(batch, "attention_mask", input_ids, where)
    loss_mask = _optional_mask(batch, "loss_mask", input_ids, where)
    input_ids = input_ids.to(device, non_blocking=True)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device, non_blocking=True).long()
    real = attention_mask.bool()  # (B, T)
    targets = loss_mask.to(device, non_blocking=True).bool() if loss_mask is not None else real
    target_mask = targets[:, 1:] & real[:, 1:] & real[:, :-1]  # (B, T-1)
    return PreparedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_mask=target_mask,
        input_tokens=int(real.sum()),
    )


def _field(batch: Batch, key: str) -> object | None:
    """`batch[key]` of a mapping or `batch.key` of an object; None when absent."""
    if isinstance(batch, Mapping):
        return batch.get(key)
    return getattr(batch, key, None)


def _optional_mask(batch: Batch, key: str, input_ids: Tensor, where: str) -> Tensor | None:
    mask = _field(batch, key)
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"{where}: {key} must be a tensor of shape {tuple(input_ids.shape)} like input_ids, got {_describe(mask)}"
        )
    return mask


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
