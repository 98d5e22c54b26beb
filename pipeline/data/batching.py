"""Length-bucketed, deterministic, resumable batches for training, and left-padded prompt batches.

Order of one epoch (a pure function of ``seed`` and the epoch number):
  1. shuffle all row indices;
  2. cut them into windows of ``batch_size * bucket_batches`` rows and sort each window by length,
     so a batch holds rows of similar length (little padding);
  3. cut each window into batches and shuffle the order of all batches.
Every row appears exactly once per epoch. The position of a batch is global across epochs
(position = epoch * batches_per_epoch + index), so a resumed run asks for ``start=N`` and gets the
same batches as the uninterrupted run from its N-th batch on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "BatchingError",
    "Batch",
    "BucketBatchPlan",
    "collate",
    "iter_batches",
    "prompt_messages",
    "prompt_batch",
]

IGNORE_INDEX = -100


class BatchingError(ValueError):
    """Bad batching arguments or rows."""


@dataclass
class Batch:
    """A right-padded training batch."""

    input_ids: torch.Tensor  # (B, T) long, pad_id after each row's end
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    loss_mask: torch.Tensor  # (B, T) bool, True = this token is a training target
    labels: torch.Tensor  # (B, T) long, input_ids where loss_mask else -100 (unshifted, HF convention)
    indices: list[int]  # row index (into the tokenised dataset) of each batch row
    position: int = -1  # global batch position (for resume); -1 when built outside iter_batches

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                     self.labels.to(device), self.indices, self.position)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


class BucketBatchPlan:
    """Deterministic bucketed batch order over rows of the given lengths (see module docstring)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, bucket_batches: int = 16,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise BatchingError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(bucket_batches, int) or bucket_batches < 1:
            raise BatchingError(f"bucket_batches must be an int >= 1, got {bucket_batches!r}")
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise BatchingError("cannot batch an empty dataset")
        if drop_last and len(self.lengths) < batch_size:
            raise BatchingError(f"drop_last with {len(self.lengths)} rows < batch_size {batch_size} gives no batches")
        self.batch_size, self.seed, self.bucket_batches = batch_size, seed, bucket_batches
        self.shuffle, self.drop_last = shuffle, drop_last

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        """Row indices of every batch of ``epoch`` in order."""
        if epoch < 0:
            raise BatchingError(f"epoch must be >= 0, got {epoch}")
        order = list(range(len(self.lengths)))
        rng = random.Random(f"batches/{self.seed}/{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        window = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])  # stable sort
            batches.extend(chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def iter_positions(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, list[int]]]:
        """(global position, row indices) from ``start`` up to ``stop`` (exclusive; None = forever)."""
        if start < 0:
            raise BatchingError(f"start must be >= 0, got {start}")
        per_epoch = len(self)
        pos = start
        while stop is None or pos < stop:
            epoch, offset = divmod(pos, per_epoch)
            plan = self.epoch(epoch)
            for idx in plan[offset:]:
                if stop is not None and pos >= stop:
                    return
                yield pos, idx
                pos += 1


def collate(rows: Sequence[Mapping[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None) -> Batch:
    """Right-pad rows with ``input_ids`` and ``loss_mask`` into a Batch."""
    if not rows:
        raise BatchingError("cannot collate zero rows")
    for i, r in enumerate(rows):
        if "input_ids" not in r or "loss_mask" not in r:
            raise BatchingError(f"row {i} needs 'input_ids' and 'loss_mask' (keys: {sorted(r)})")
        if len(r["input_ids"]) != len(r["loss_mask"]):
            raise BatchingError(f"row {i}: input_ids and loss_mask lengths differ")
        if len(r["input_ids"]) == 0:
            raise BatchingError(f"row {i} is empty")
    T = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.as_tensor(list(r["loss_mask"]), dtype=torch.bool)
    labels = torch.where(loss_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    indices = [int(r.get("index", b)) for b, r in enumerate(rows)]
    return Batch(input_ids, attention_mask, loss_mask, labels, indices)


def _fetch(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Rows ``indices`` of a datasets.Dataset (column dict) or a list of dict rows."""
    if hasattr(dataset, "column_names"):
        cols = dataset[indices]  # datasets: dict of column -> list
        return [{"input_ids": cols["input_ids"][k], "loss_mask": cols["loss_mask"][k], "index": i}
                for k, i in enumerate(indices)]
    return [{"input_ids": dataset[i]["input_ids"], "loss_mask": dataset[i]["loss_mask"], "index": i} for i in indices]


def _lengths(dataset: Any) -> list[int]:
    if hasattr(dataset, "column_names"):
        if "length" in dataset.column_names:
            return list(dataset["length"])
        return [len(x) for x in dataset["input_ids"]]
    return [len(r["input_ids"]) for r in dataset]


def iter_batches(dataset: Any, batch_size: int, pad_id: int, *, seed: int = 0, start: int = 0,
                 stop: int | None = None, bucket_batches: int = 16, shuffle: bool = True,
                 drop_last: bool = False, pad_to_multiple_of: int | None = None) -> Iterator[Batch]:
    """Padded batches of a tokenised dataset in bucketed order, from global position ``start``.

    ``stop=None`` cycles through epochs forever; ``stop=len(BucketBatchPlan(...))`` is one epoch.
    """
    plan = BucketBatchPlan(_lengths(dataset), batch_size, seed=seed, bucket_batches=bucket_batches,
                           shuffle=shuffle, drop_last=drop_last)
    for pos, idx in plan.iter_positions(start, stop):
        batch = collate(_fetch(dataset, idx), pad_id, pad_to_multiple_of=pad_to_multiple_of)
        batch.position = pos
        yield batch


# --------------------------------------------------------------------------------------------------
# generation prompts
# --------------------------------------------------------------------------------------------------


def prompt_messages(row: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages of a chat row up to (not including) its final assistant turn(s)."""
    messages = row.get("messages") if isinstance(row, Mapping) else row
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise BatchingError("a prompt row needs a non-empty 'messages' list")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs:
        raise BatchingError("a prompt row has only assistant messages")
    return msgs


def prompt_batch(rows: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]],
                 tokenizer: PreTrainedTokenizerBase, *, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """LEFT-padded prompt batch for ``model.generate(**batch)``.

    Each prompt is the chat template applied to the row's messages up to the assistant turn, with
    ``add_generation_prompt=True``. Prompts longer than ``max_length`` keep their last tokens.
    Returns input_ids (B, T) and attention_mask (B, T), pads on the left.
    """
    if not rows:
        raise BatchingError("prompt_batch needs at least one row")
    if not tokenizer.chat_template:
        raise BatchingError("the tokenizer has no chat template, so chat prompts cannot be built")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise BatchingError("the tokenizer has neither a pad nor an eos token to pad prompts with")
    encoded: list[list[int]] = []
    for row in rows:
        out = tokenizer.apply_chat_template(prompt_messages(row), tokenize=True, return_dict=True,
                                            add_generation_prompt=True)
        ids = list(out["input_ids"])
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]
        encoded.append(ids)
    T = max(len(x) for x in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)  # (B, T)
    for b, ids in enumerate(encoded):
        input_ids[b, T - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[b, T - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
