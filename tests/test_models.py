"""HF models under SP give, summed over the SP group, the plain model's loss and gradients.

References: the unmodified model (eager attention) on the full batch; for packed rows, each document run alone,
so attention leaking across documents fails. float32 throughout: tolerances are float32 rounding of sums over
a few thousand terms.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from models_zoo import FAMILIES, VOCAB, tiny_model

import hf_seqpar

LOSS_RTOL = 2e-5  # float32 loss of order 4, reduced in a different order
GRAD_ATOL = 2e-5  # float32 gradients of order 1e-2 .. 1, summed over ranks in a different order
_GROUPS: dict = {}


def _setup(mode: str, ulysses_size=None):
    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), mode=mode, ulysses_size=ulysses_size)
    if (mode, ulysses_size) not in _GROUPS:
        _GROUPS[(mode, ulysses_size)] = hf_seqpar.init_groups(cfg)
    return cfg, _GROUPS[(mode, ulysses_size)]


def _rows(kind: str):
    """(features for the collator, list of independent sequences the reference runs alone)."""
    gen = torch.Generator().manual_seed(7)
    if kind == "padded":  # batch of 2 with right padding, lengths not divisible by the layout multiple
        a, b = torch.randint(3, VOCAB, (29,), generator=gen), torch.randint(3, VOCAB, (17,), generator=gen)
        return [{"input_ids": a}, {"input_ids": b}], "padded", [a, b]
    docs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (7, 12, 3, 9)]  # crosses shard boundaries
    return [{"input_ids": d} for d in docs], "packed", docs


def _base_collator(kind):
    def pad_rows(features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = f["input_ids"]
            mask[i, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}

    def pack(features):
        ids = torch.cat([f["input_ids"] for f in features])[None]
        pos = torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None]
        labels = ids.clone()
        starts = torch.cumsum(torch.tensor([0] + [len(f["input_ids"]) for f in features[:-1]]), 0)
        labels[0, starts] = -100  # as DataCollatorWithFlattening: a document's first token is nobody's target
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    return pad_rows if kind == "padded" else pack


def _reference(model, sequences):
    """Mean loss over every next-token target of every sequence run alone, and its gradients."""
    total = sum(len(s) - 1 for s in sequences)
    loss = 0.0
    for seq in sequences:
        out = model(input_ids=seq[None], labels=seq[None], num_items_in_batch=torch.tensor(total))
        out.loss.backward()
        loss += out.loss.item()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _body_model_parity(family, mode, kind, ulysses_size=None, lora=False):
    cfg, groups = _setup(mode, ulysses_size)
    ref_model, sp_model = tiny_model(family), tiny_model(family)
    if lora:
        from peft import LoraConfig, get_peft_model

        lora_cfg = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        torch.manual_seed(1)
        ref_model = get_peft_model(ref_model, lora_cfg)
        torch.manual_seed(1)
        sp_model = get_peft_model(sp_model, lora_cfg)
    features, kind, sequences = _rows(kind)
    ref_loss, ref_grads = _reference(ref_model, sequences)

    hf_seqpar.apply_sequence_parallel(sp_model, config=cfg, groups=groups)
    collator = hf_seqpar.SequenceShardingCollator(_base_collator(kind), config=cfg, groups=groups)
    batch = collator(features)
    n_local = (batch["shift_labels"] != -100).sum()
    n_total = n_local.clone()
    dist.all_reduce(n_total)  # the Trainer's num_items_in_batch: every target counted once over the group
    loss = sp_model(**batch, num_items_in_batch=n_total).loss
    loss.backward()
    assert torch.isfinite(loss), f"rank {dist.get_rank()} loss {loss}"
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    errors = {"loss": abs(summed.item() - ref_loss) / abs(ref_loss)}
    names = [n for n, p in sp_model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(ref_grads), "trainable parameters differ"
    for name, param in sp_model.named_parameters():
        if param.requires_grad:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)
            errors[name] = (grad - ref_grads[name]).abs().max().item()
    return errors, int(n_local)


def _check(results):
    for rank, (errors, _) in enumerate(results):
        assert errors["loss"] < LOSS_RTOL, f"rank {rank}: loss relative error {errors['loss']}"
        bad = {k: v for k, v in errors.items() if k != "loss" and not v < GRAD_ATOL}
        assert not bad, f"rank {rank}: gradient errors {bad}"


# What the parity tests below cover; README's support table is generated from it (tests/test_readme.py).
COVERAGE = {
    "packed documents, 2 ranks": {"families": list(FAMILIES), "modes": ["ring", "allgather", "ulysses"]},
    "packed documents, 4 ranks (usp 2x2)": {"families": list(FAMILIES), "modes": ["usp"]},
    "padded batch of 2, 2 ranks": {
        "families": ["llama", "gemma2", "gpt_oss"],
        "modes": ["ring", "allgather", "ulysses"],
    },
    "LoRA (PEFT), packed, 2 ranks": {"families": ["llama", "qwen3", "gemma3"], "modes": ["ring", "ulysses"]},
}


def _params(case):
    spec = COVERAGE[case]
    return [(f, m) for f in spec["families"] for m in spec["modes"]]


@pytest.mark.parametrize("family,mode", _params("packed documents, 2 ranks"))
def test_family_parity_packed(ranks, family, mode):
    _check(ranks.run(_body_model_parity, family, mode, "packed"))


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("family,mode", _params("packed documents, 4 ranks (usp 2x2)"))
def test_usp_parity(ranks, family, mode):
    _check(ranks.run(_body_model_parity, family, mode, "packed", 2))


@pytest.mark.parametrize("family,mode", _params("padded batch of 2, 2 ranks"))
def test_family_parity_padded_batch(ranks, family, mode):
    _check(ranks.run(_body_model_parity, family, mode, "padded"))


@pytest.mark.parametrize("family,mode", _params("LoRA (PEFT), packed, 2 ranks"))
def test_lora_parity(ranks, family, mode):
    _check(ranks.run(_body_model_parity, family, mode, "packed", None, True))
