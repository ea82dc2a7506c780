"""Passkey retrieval, generated offline with a fixed seed: a number hidden at a random depth of filler text, asked
for at the end (the long-context test of Mohtashami & Jaggi, "Landmark Attention", 2023).

    <s> the sky is blue . ... the pass key is 7 1 4 3 2 . remember it . ... here we go .
        what is the pass key ? the pass key is | 7 1 4 3 2

A row is {"prompt": ..., "completion": ...}; with `tiny.word_tokenizer` every word is one token, so `length` counts
the tokens of `<s>` + prompt + completion exactly.
"""

from __future__ import annotations

import random

import torch

from .tiny import FILLER_SENTENCES

QUESTION = "what is the pass key ? the pass key is"


def _needle(key: list[str]) -> list[str]:
    return f"the pass key is {' '.join(key)} . remember it .".split()


def passkey_row(rng: random.Random, length: int, digits: int = 5) -> dict:
    """One row of exactly `length` tokens (with `<s>`); the needle sits at a uniformly random depth."""
    key = [str(rng.randrange(10)) for _ in range(digits)]
    needle, question = _needle(key), QUESTION.split()
    budget = length - 1 - len(needle) - len(question) - digits
    if budget < 0:
        raise ValueError(f"hf_seqpar: length={length} is too short for a passkey row; use at least {length - budget}")
    filler: list[str] = []
    while len(filler) < budget:
        filler += rng.choice(FILLER_SENTENCES).split()
    filler = filler[:budget]
    depth = rng.randint(0, budget)
    prompt = filler[:depth] + needle + filler[depth:] + question
    return {"prompt": " ".join(prompt), "completion": " ".join(key)}


def passkey_rows(n: int, length: int, seed: int, digits: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [passkey_row(rng, length, digits) for _ in range(n)]


def encode(tokenizer, row: dict) -> dict:
    """input_ids = `<s>` prompt completion; labels = -100 on `<s>` and the prompt (the loss is on the answer only)."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


def batch(tokenizer, rows: list[dict]) -> dict:
    """Rows of one length stacked into tensors (`input_ids`, `labels`)."""
    encoded = [encode(tokenizer, row) for row in rows]
    return {key: torch.tensor([e[key] for e in encoded]) for key in ("input_ids", "labels")}


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Fraction of rows whose whole passkey greedy decoding gets right.

    One forward per batch: greedy decoding reproduces every digit exactly when, and only when, the argmax at each
    answer position (given the true digits before it) is the true digit, so the teacher-forced argmax decides it."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        tensors = batch(tokenizer, rows[start : start + batch_size])
        targets = tensors["labels"][:, 1:]
        predicted = model(input_ids=tensors["input_ids"]).logits[:, :-1].argmax(-1)
        answer = targets != -100
        correct += int(((predicted == targets) | ~answer).all(dim=1).sum())
    model.train(was_training)
    return correct / len(rows)
