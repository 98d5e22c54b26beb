"""Quality of a checkpoint: answer accuracy (greedy generation, checked answers), NLL and KL to the teacher.

- answer accuracy: the chat prompt of each test problem, greedy decoding, the final answer checked by
  `pipeline.data.is_correct`. Decoding runs on the project's `GenerationEngine` (static caches, batched
  greedy decode, a CUDA graph and fused kernels on the GPU, stop at end-of-sequence); a teacher that is not
  a hybrid is converted to an all-attention hybrid for it (a copy). `generate()` is the fallback for a
  model the engine cannot run (a LOO model with a whole block removed) and the reference it is tested on.
- NLL: mean negative log-likelihood per target token (assistant tokens of chat rows) of the test split.
- KL to the teacher: mean per target token of the reverse KL, KL(student || teacher) at T = 1, the
  recipe's distillation objective; 0 for the teacher itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.train.batches import prepare_batch
from pipeline.train.losses import DEFAULT_CHUNK_ELEMENTS, chunked_cross_entropy, chunked_distill_loss


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_accuracy(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    max_prompt_length: int | None = None,
    engine: bool = True,
) -> tuple[float, list[dict[str, Any]]]:
    """Greedy answers to chat problems; returns (accuracy, one record per problem). Decoding stops at the
    tokenizer's eos or the chat template's end-of-turn token (`pipeline.data.stop_token_ids`); an answer
    cut off by `max_new_tokens` is judged by what it wrote.

    `engine=False` (or a model the engine cannot run) decodes with `model.generate()` instead.
    """
    from pipeline.data import is_correct, prompt_batch, stop_token_ids

    if not rows:
        return 0.0, []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)  # eos and the template's end of turn where that is another token
    batches = [(rows[start: start + batch_size], prompt_batch(rows[start: start + batch_size], tokenizer,
                                                               max_length=max_prompt_length))
               for start in range(0, len(rows), batch_size)]
    runner = _engine_for(model, min(batch_size, len(rows)), max(b["input_ids"].shape[1] for _, b in batches)
                         + max_new_tokens) if engine else None
    training = model.training
    model.eval()
    device = model_device(model)
    records = []
    try:
        for chunk, batch in batches:
            if runner is not None:
                new_tokens = _engine_answers(runner, batch, max_new_tokens, stops)[: len(chunk)]
            else:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                    eos_token_id=stops or None,
                )
                new_tokens = out[:, batch["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, text in zip(chunk, texts):
                records.append({"answer": str(row["answer"]), "generated": text,
                                "correct": is_correct(text, row["answer"])})
    finally:
        model.train(training)
    accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
    return accuracy, records


def _engine_for(model: nn.Module, batch_size: int, max_length: int):
    """A GenerationEngine for `model` (a non-hybrid teacher as an all-attention hybrid copy), or None when
    the engine cannot run it (a block replaced by a skip, a sliding window shorter than the run)."""
    from pipeline.convert import ConversionError, hybridize
    from pipeline.evaluate.engine import GenerationEngine
    from pipeline.model import HybridForCausalLM
    from pipeline.model.modeling import HybridDecoderLayer

    if not isinstance(model, HybridForCausalLM):
        try:
            model = hybridize(model, [])
        except ConversionError:  # an architecture the conversion does not take: generate() it is
            return None
    if not all(isinstance(layer, HybridDecoderLayer) for layer in model.model.layers):
        return None
    window = model.config.sliding_window
    if window is not None and window < max_length:
        return None
    return GenerationEngine(model, batch_size, max_length, prefill_batch=batch_size)


def _engine_answers(engine, batch: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: Sequence[int]):
    """New tokens (b, <= max_new_tokens) for a left-padded batch; a short batch is filled up to the
    engine's batch size with copies of its last row (their answers are dropped by the caller)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    missing = engine.batch_size - input_ids.shape[0]
    if missing:
        input_ids = torch.cat([input_ids, input_ids[-1:].expand(missing, -1)])
        mask = torch.cat([mask, mask[-1:].expand(missing, -1)])
    return engine.generate(input_ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id or None).tokens.cpu()


@torch.no_grad()
def nll_and_kl(
    model: nn.Module,
    batches: Iterable,
    *,
    teacher: nn.Module | None = None,
    chunk_tokens: int = 1024,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Mean NLL per target token and (with a teacher) mean KL(student || teacher) per target token.

    The losses run through the lm_head in chunks of at most `chunk_tokens` tokens and `chunk_elements`
    logits (see `pipeline.train.losses`).
    """
    model.eval()
    device = model_device(model)
    nll_sum, kl_sum, tokens = 0.0, 0.0, 0
    for position, batch in enumerate(batches):
        prepared = prepare_batch(batch, position=position, max_batch_size=batch.input_ids.shape[0],
                                 max_length=batch.input_ids.shape[1], device=device)
        mask = prepared.target_mask  # (b, t-1): position t predicts token t+1
        count = int(mask.sum())
        if count == 0:
            continue
        hidden = model.model(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                             use_cache=False).last_hidden_state[:, :-1]
        head = model.get_output_embeddings().weight
        targets = prepared.input_ids[:, 1:]
        nll_sum += chunked_cross_entropy(hidden, head, targets, mask, chunk_tokens,
                                         chunk_elements=chunk_elements, reduction="sum").item()
        if teacher is not None:
            teacher_hidden = teacher.model(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                                           use_cache=False).last_hidden_state[:, :-1]
            kl_sum += chunked_distill_loss(
                hidden, head, teacher_hidden, teacher.get_output_embeddings().weight, mask,
                kind="reverse_kl", chunk_tokens=chunk_tokens, chunk_elements=chunk_elements, reduction="sum",
            ).item()
        tokens += count
    if tokens == 0:
        raise ValueError("evaluation data has no target tokens")
    result = {"nll": nll_sum / tokens, "eval_tokens": float(tokens)}
    if teacher is not None:
        result["kl_to_teacher"] = kl_sum / tokens
    return result


__all__ = ["answer_accuracy", "model_device", "nll_and_kl"]
