"""Stage 1 of the demo: teach a freshly initialised tiny Llama passkey retrieval on SHORT rows only (a plain PyTorch
loop, one process). Like a real base model, it then works at the lengths it was trained on and fails far beyond
them, which is what the long-context LoRA fine-tune of stage 2 has to fix."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from . import passkey


def pretrain(
    model,
    tokenizer,
    *,
    steps: int,
    seed: int,
    lengths: tuple[int, int] = (32, 128),
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    report: Callable[[str], None] = print,
    report_every: int = 100,
) -> list[float]:
    """Train in place on rows of random lengths in `lengths` (inclusive); returns the loss of every step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        length = rng.randint(*lengths)
        rows = [passkey.passkey_row(rng, length) for _ in range(batch_size)]
        loss = model(**passkey.batch(tokenizer, rows)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % report_every == 0 or step == steps:
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            report(f"  step {step:>5}/{steps}  loss {recent:.3f}  ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return losses
