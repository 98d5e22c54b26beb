"""The demo's configuration: the generator's settings (`DemoDataConfig`) and the calibrated tiny teacher
(`DemoTeacherConfig`, with its training run as a `TrainConfig`). Imports no torch; the generator itself is
`pipeline.data.demo`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.train import TrainConfig

__all__ = ["DemoDataConfig", "DemoDataError", "DemoTeacherConfig"]


class DemoDataError(ValueError):
    """Invalid demo-data settings (or settings that cannot produce the requested rows)."""


@dataclass
class DemoDataConfig:
    """Settings of the demo generator; the defaults are the calibrated demo task.

    A problem is a start number followed by ``min_ops..max_ops`` additions/subtractions of operands in
    ``[min_operand, max_operand]``; every intermediate result stays in ``[0, max_value]``.
    """

    seed: int = 0
    # reasoning traces
    n_train: int = 20000
    n_validation: int = 500
    n_test: int = 500
    min_ops: int = 2
    max_ops: int = 4
    min_operand: int = 1
    max_operand: int = 9
    max_value: int = 19
    # generic text corpus
    n_text_train: int = 20000
    n_text_validation: int = 500
    n_text_test: int = 500
    min_sentences: int = 1
    max_sentences: int = 3

    def validate(self) -> "DemoDataConfig":
        """Raise DemoDataError naming the first bad field; return self."""
        for name in ("n_train", "n_validation", "n_test", "n_text_train", "n_text_validation", "n_text_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise DemoDataError(f"DemoDataConfig.{name} must be an int >= 0, got {value!r}")
        if not 1 <= self.min_ops <= self.max_ops:
            raise DemoDataError(f"DemoDataConfig needs 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 0 <= self.min_operand <= self.max_operand:
            raise DemoDataError(
                f"DemoDataConfig needs 0 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}"
            )
        if self.max_value < max(1, self.min_operand):
            raise DemoDataError(
                f"DemoDataConfig.max_value must be >= max(1, min_operand), got {self.max_value}"
            )
        if not 1 <= self.min_sentences <= self.max_sentences:
            raise DemoDataError(
                f"DemoDataConfig needs 1 <= min_sentences <= max_sentences, got {self.min_sentences}, {self.max_sentences}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _demo_teacher_train() -> TrainConfig:
    """The calibrated schedule of the demo teacher (next-token CE on the reasoning traces)."""
    return TrainConfig(steps=1200, lr=3e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.01,
                       betas=(0.9, 0.95), grad_clip=1.0, batch_size=32, max_length=96, seed=0, trainable="all",
                       loss="ce", save_every=120, log_every=80)


@dataclass
class DemoTeacherConfig:
    """Calibrated tiny Llama teacher for the bundled demo (trains in under 5 min on 2 CPU cores).

    Model fields map 1:1 onto ``transformers.LlamaConfig`` (see ``llama_config_kwargs``); 1.21M
    parameters with the 104-token char vocabulary. ``train`` is the one training-settings shape every
    stage uses: AdamW with linear warm-up, then cosine decay to ``min_lr_ratio * lr``; loss on assistant
    tokens only; no dropout.

    Calibration: on the default ``DemoDataConfig`` the default 1200 steps answer 100% of 200 held-out
    test problems greedily (validation accuracy reaches 100% by step 800; about 165 s on 2 idle CPU
    cores). On oversubscribed cores one thread (``torch.set_num_threads(1)``) trains faster than two
    (0.22-0.29 against 0.5-2 s/step).
    """

    # model (vocab_size comes from the tokenizer; the char tokenizer has 104 entries)
    hidden_size: int = 128
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # every n-th training batch comes from the generic text corpus (0 = reasoning traces only, as calibrated)
    generic_every: int = 0
    # the training run (the data it reads is the run's `data` section: data.distill, data.generic)
    train: TrainConfig = field(default_factory=_demo_teacher_train)

    def __post_init__(self) -> None:
        if self.train.loss != "ce":
            raise DemoDataError(f"teacher.demo.train.loss must be 'ce' (the teacher learns from data), got {self.train.loss!r}")
        if not isinstance(self.generic_every, int) or self.generic_every < 0:
            raise DemoDataError(f"teacher.demo.generic_every must be an int >= 0, got {self.generic_every!r}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DemoDataError(f"teacher.demo.{name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise DemoDataError(
                f"teacher.demo: hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                f"{self.num_attention_heads}, itself a multiple of num_key_value_heads {self.num_key_value_heads}")

    def llama_config_kwargs(self, vocab_size: int, pad_token_id: int | None = None,
                            bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``transformers.LlamaConfig`` (no torch needed to build them)."""
        if vocab_size <= 0:
            raise DemoDataError(f"vocab_size must be > 0, got {vocab_size}")
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": pad_token_id,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
        }
