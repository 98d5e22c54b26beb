"""Generic text that a pretrained teacher models well: its own samples, at temperature 1, from varied openings.

A pretrained teacher's quality on "generic text" is only meaningful on text it models well; the demo's
generated sentences are not that for a real model. `sample_texts` continues each of a bundled list of
openings (news, stories, science, instructions, letters, dialogue, ...) with the teacher itself, by ancestral
sampling at `temperature`, so the teacher's NLL per token on the result is its own entropy rate there and a
student's NLL / KL on it says how much of the teacher's general language modelling it kept.

Every random draw comes from a seeded CPU `torch.Generator` (one uniform number per row and step, moved to
the model's device, inverted through the cumulative distribution), so the same seed draws the same numbers
on any device; the sampled tokens then differ between devices only where float rounding moves a
cumulative-probability boundary across a draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Varied openings, one genre or register each; rows cycle through them in a seeded order.
OPENINGS: tuple[str, ...] = (
    "The city council met on Tuesday evening to discuss",
    "Once upon a time, in a village at the edge of a forest,",
    "Photosynthesis is the process by which",
    "To make a simple loaf of bread, you will need",
    "Dear Maria, I hope this letter finds you well.",
    "The history of the printing press begins",
    "In this tutorial, we will learn how to",
    "The weather forecast for the weekend says",
    "Scientists have discovered a new species of",
    "My favourite memory from childhood is",
    "The main advantage of renewable energy is",
    "Here are five tips for staying productive while working from home:",
    "The old lighthouse keeper looked out at the sea and",
    "A healthy breakfast should include",
    "The French Revolution began in 1789 when",
    "When I first moved to the city,",
    "The key to a good night's sleep is",
    "Water boils at 100 degrees Celsius because",
    "The museum's new exhibition features",
    "In economics, the law of supply and demand states that",
    "She opened the door slowly and saw",
    "The best way to learn a new language is",
    "Our company is pleased to announce",
    "The human heart has four chambers:",
    "Yesterday, the football team won",
    "If you are planning a trip to Japan,",
    "The library is open from",
    "Volcanoes form when",
    "He had never seen so many stars in the sky.",
    "The recipe calls for two cups of flour,",
    "Climate change affects farmers in many ways.",
    "The first step in writing a good essay is",
    "Mathematics is often called the language of",
    "The train was late again, so",
    "Honey bees communicate with each other by",
    "Thank you for your order. Your package will",
    "The ancient Romans built roads that",
    "A good friend is someone who",
    "The computer would not start, so I",
    "In the middle of the night, a strange noise",
    "Exercise is important for mental health because",
    "The mountains were covered in snow, and",
    "Electric cars work by",
    "The teacher asked the students to",
    "Many people enjoy gardening because",
    "The Amazon rainforest is home to",
    "Question: Why is the sky blue? Answer:",
    "The interview went better than expected.",
    "Coffee was first discovered in",
    "Our solar system consists of",
    "The little robot wanted nothing more than",
    "To reduce waste at home, you can",
    "The concert started at eight o'clock, and",
    "The Great Wall of China was built",
    "Learning to play the piano takes",
    "The detective examined the room carefully.",
    "Bicycles are a popular way to travel because",
    "The ocean covers more than seventy percent of",
    "After years of hard work, she finally",
    "The invention of the telephone changed",
    "Good customer service means",
    "The forest was quiet except for",
    "Vaccines help the body fight disease by",
    "On the first day of school,",
)


@dataclass(frozen=True)
class SampledText:
    text: str
    opening: str
    new_tokens: int


def opening_order(count: int, seed: int) -> list[str]:
    """`count` openings: the bundled list cycled in an order shuffled by `seed` (a CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(OPENINGS), generator=generator).tolist()
    return [OPENINGS[order[i % len(order)]] for i in range(count)]


@torch.no_grad()
def sample_texts(model, tokenizer, count: int, *, max_new_tokens: int = 128, temperature: float = 1.0,
                 batch_size: int = 32, seed: int = 0) -> list[SampledText]:
    """`count` texts: each an opening continued by `model` with ancestral sampling at `temperature` for at
    most `max_new_tokens` tokens (stopping at eos), as `bos + opening` without a chat template. Rows go in
    batches of `batch_size`, left-padded (masked, with positions counted from each row's first token);
    draws come from a CPU generator seeded by `seed`, one per row and step, in row order."""
    if count < 0 or max_new_tokens < 1 or batch_size < 1 or not temperature > 0:
        raise ValueError("sample_texts needs count >= 0, max_new_tokens >= 1, batch_size >= 1, temperature > 0")
    generator = torch.Generator().manual_seed(seed)
    openings = opening_order(count, seed)
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    texts: list[SampledText] = []
    model.eval()
    for start in range(0, count, batch_size):
        chunk = openings[start:start + batch_size]
        prompts = [prefix + tokenizer(opening, add_special_tokens=False)["input_ids"] for opening in chunk]
        for opening, row in zip(chunk, _sample(model, prompts, max_new_tokens, temperature, eos, generator)):
            ended = row.index(eos) if eos is not None and eos in row else len(row)
            texts.append(SampledText(opening + tokenizer.decode(row[:ended], skip_special_tokens=True), opening,
                                     ended))
    return texts


def _prefill(model, prompts: list[list[int]], pad: int):
    """(cache, next-token logits, attention mask, last positions) of left-padded `prompts`."""
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.past_key_values, out.logits[:, -1], mask, positions


def _sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, eos: int | None,
            generator: torch.Generator) -> list[list[int]]:
    """Continuations of left-padded `prompts`, token by token with the model's KV cache."""
    device = next(model.parameters()).device
    size = len(prompts)
    cache, logits, mask, positions = _prefill(model, prompts, eos if eos is not None else 0)
    done = torch.zeros(size, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        cdf = probs.cumsum(-1)
        draw = torch.rand(size, 1, generator=generator).to(device, torch.float32) * cdf[:, -1:]
        token = torch.searchsorted(cdf, draw).clamp_max(probs.shape[-1] - 1).squeeze(1)
        if eos is not None:
            token = torch.where(done, torch.full_like(token, eos), token)
            done |= token == eos
        generated.append(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(size, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return torch.stack(generated, dim=1).tolist()


def sample_rows(texts: list[SampledText]) -> list[dict[str, Any]]:
    """Plain-text rows ({"text": ...}) of sampled texts, for `datasets` / jsonl."""
    return [{"text": sample.text, "opening": sample.opening} for sample in texts]


__all__ = ["OPENINGS", "SampledText", "opening_order", "sample_rows", "sample_texts"]
