"""Tensor parallelism with sequence-parallel regions (tp_size) composed with ring / Ulysses gives the plain model's
loss and gradients.

Reference: the unmodified model (eager attention) on the full batch; packed rows run each document alone, so
attention or MLP pieces leaking across documents or TP pieces fail. A weight shard's gradient, summed over the SP
group of its TP rank and gathered over the TP group, must equal the plain weight's gradient; a replicated
parameter's gradient summed over all ranks must equal the plain one; the losses of all ranks sum to the plain mean.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from models_zoo import tiny_model
from test_models import _base_collator, _reference, _rows

import hf_seqpar

LOSS_RTOL = 2e-5
GRAD_ATOL = 2e-5
BF16_LOSS_RTOL, BF16_GRAD_ATOL = 2e-2, 2e-2  # bf16 autocast: both runs round matmuls to 8 mantissa bits
_GROUPS: dict = {}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(mode: str, tp: int, sp: int, ulysses_size=None):
    cfg = hf_seqpar.SeqParConfig(sp_size=sp, tp_size=tp, mode=mode, ulysses_size=ulysses_size)
    key = (mode, tp, sp, ulysses_size)
    if key not in _GROUPS:
        _GROUPS[key] = hf_seqpar.init_groups(cfg)
    return cfg, _GROUPS[key]


def _lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=dropout)
    torch.manual_seed(1)
    return get_peft_model(model, cfg)


def _full_grad(grad: torch.Tensor, plain_shape, groups) -> torch.Tensor:
    """Sum a rank's gradient over the ranks it shares with, and rebuild a split weight from its TP pieces."""
    if tuple(grad.shape) == tuple(plain_shape):  # replicated: partial gradients sum over the world
        dist.all_reduce(grad)
        return grad
    dim = next(d for d, (a, b) in enumerate(zip(grad.shape, plain_shape, strict=True)) if a != b)
    dist.all_reduce(grad, group=groups.shard_grad_group)  # same shard: the dp x sp ranks of this TP index
    pieces = [torch.empty_like(grad) for _ in range(groups.tp_size)]
    dist.all_gather(pieces, grad.contiguous(), group=groups.tp_group)
    return torch.cat(pieces, dim)


def _body_tp_parity(family, mode, kind, tp=2, sp=2, lora=False, bf16=False, ulysses_size=None, checkpointing=False):
    cfg, groups = _setup(mode, tp, sp, ulysses_size)
    ref_model, tp_model = tiny_model(family), tiny_model(family)
    if lora:
        ref_model, tp_model = _lora(ref_model), _lora(tp_model)
    if checkpointing:
        tp_model.gradient_checkpointing_enable({"use_reentrant": False})
    features, kind, sequences = _rows(kind)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        ref_loss, ref_grads = _reference(ref_model, sequences)
    plain_shapes = {n: p.shape for n, p in ref_model.named_parameters()}

    hf_seqpar.apply_sequence_parallel(tp_model, config=cfg, groups=groups)
    split = [n for n, p in tp_model.named_parameters() if p.shape != plain_shapes[n]]
    collator = hf_seqpar.SequenceShardingCollator(_base_collator(kind), config=cfg, groups=groups)
    batch = collator(features)
    n_total = (batch["shift_labels"] != -100).sum()
    dist.all_reduce(n_total)  # every target counted once over the world (TP pieces are disjoint)
    with autocast:
        loss = tp_model(**batch, num_items_in_batch=n_total).loss
    loss.backward()
    assert torch.isfinite(loss), f"rank {dist.get_rank()} loss {loss}"
    summed = loss.detach().float().clone()
    dist.all_reduce(summed)
    errors = {"loss": abs(summed.item() - ref_loss) / abs(ref_loss)}
    for name, param in tp_model.named_parameters():
        if param.requires_grad:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            errors[name] = (_full_grad(grad.float(), plain_shapes[name], groups) - ref_grads[name]).abs().max().item()
    return errors, split


def _check(results, bf16=False):
    loss_rtol, grad_atol = (BF16_LOSS_RTOL, BF16_GRAD_ATOL) if bf16 else (LOSS_RTOL, GRAD_ATOL)
    for rank, (errors, split) in enumerate(results):
        assert len(split) >= 7, f"rank {rank}: only {split} were split over TP"
        assert errors["loss"] < loss_rtol, f"rank {rank}: loss relative error {errors['loss']}"
        bad = {k: v for k, v in errors.items() if k != "loss" and not v < grad_atol}
        assert not bad, f"rank {rank}: gradient errors {bad}"
    return max(max(e.values()) for e, _ in results)


# What the TP x SP parity tests cover (world 4 = TP 2 x SP 2); README's support table lists it.
COVERAGE = {
    "TP 2 x SP 2, packed documents": {"families": ["llama", "qwen2", "mistral"], "modes": ["ring", "ulysses"]},
    "TP 2 x SP 2, padded batch of 2": {"families": ["llama"], "modes": ["ring", "allgather"]},
    "TP 2 x SP 2, LoRA, packed": {"families": ["llama", "qwen2"], "modes": ["ring"]},
}


def _params(case):
    spec = COVERAGE[case]
    return [(f, m) for f in spec["families"] for m in spec["modes"]]


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("family,mode", _params("TP 2 x SP 2, packed documents"))
def test_tp_sp_packed(ranks, family, mode):
    _check(ranks.run(_body_tp_parity, family, mode, "packed"))


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("family,mode", _params("TP 2 x SP 2, padded batch of 2"))
def test_tp_sp_padded(ranks, family, mode):
    _check(ranks.run(_body_tp_parity, family, mode, "padded"))


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("family,mode", _params("TP 2 x SP 2, LoRA, packed"))
def test_tp_sp_lora(ranks, family, mode):
    _check(ranks.run(_body_tp_parity, family, mode, "packed", lora=True))


@pytest.mark.parametrize("ranks", [4], indirect=True)
def test_tp_sp_bf16_autocast_checkpointing(ranks):
    _check(ranks.run(_body_tp_parity, "llama", "ring", "packed", lora=True, bf16=True, checkpointing=True), bf16=True)


def test_tp_only(ranks):
    """tp_size=2, sp_size=1: Megatron-SP alone."""
    _check(ranks.run(_body_tp_parity, "llama", "ring", "packed", tp=2, sp=1))


def _body_refused_heads():
    cfg = hf_seqpar.SeqParConfig(sp_size=1, tp_size=4)
    try:
        cfg.resolve(4, 2)
    except ValueError as err:
        return str(err)
    return None


def test_tp_must_divide_kv_heads():
    message = _body_refused_heads()
    assert message.startswith("hf_seqpar: tp_size=4 must divide num_attention_heads=4 and num_key_value_heads=2")
