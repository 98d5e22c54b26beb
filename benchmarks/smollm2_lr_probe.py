"""Does the first distillation's loss fall from its MIL start on the real teacher, and at which lr?

SmolLM2-135M-Instruct (its GGUF, `make smollm2`), 15 of its 30 layers MIL-converted to Mamba, then 10
reverse-KL steps (2 of warm-up, all parameters trained) on 12 fixed batches of 4 demo reasoning traces in
ChatML, once per learning rate. Prints each run's per-step losses. CPU, a few minutes per rate.

    python benchmarks/smollm2_lr_probe.py GGUF 1e-4 3e-4 2e-3
"""

from __future__ import annotations

import sys
import time

import torch

from pipeline.convert import hybridize
from pipeline.data import generate_demo_data, iter_batches, tokenize_rows
from pipeline.data.demo import DemoDataConfig
from pipeline.model.gguf import load_gguf
from pipeline.train import TrainConfig, train

LAYERS = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 22, 27]


def main(gguf: str, rates: list[float]) -> None:
    torch.set_num_threads(2)
    teacher, tokenizer = load_gguf(gguf)
    rows = generate_demo_data(DemoDataConfig(n_train=64, n_validation=8, n_test=8)).reasoning["train"]
    texts = [{"text": tokenizer.apply_chat_template(list(row["messages"]), tokenize=False)} for row in rows]
    batches = list(iter_batches(tokenize_rows(texts, tokenizer, 160), 4, tokenizer.pad_token_id, seed=0, stop=12))
    for lr in rates:
        student = hybridize(teacher, LAYERS, seed=0)
        cfg = TrainConfig(steps=10, lr=lr, warmup_steps=2, batch_size=4, max_length=160, trainable="all",
                          loss="reverse_kl", log_every=1)
        losses: list[float] = []
        started = time.time()
        train(student, batches, cfg, teacher=teacher, callback=lambda metrics: losses.append(round(metrics.loss, 3)))
        print(f"lr {lr}: {losses}  {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [float(rate) for rate in sys.argv[2:]])
