"""Mixed precision under SP: exact to the precision, against the plain model under the SAME setting.

Settings: torch.autocast bf16 / fp16 over float32 weights (what Trainer(bf16=True) / (fp16=True) do), and bf16 /
fp16 weights; with gradient checkpointing (reentrant and not) and LoRA. The plain reference is the unmodified
model with torch's SDPA, each packed document run alone, under the same setting.

Tolerance (one rule for every case): SP vs plain-low-precision must be within TOL_FACTOR x the error that low
precision itself makes (plain-low-precision vs plain-float32), floored at one unit of the dtype's rounding, so a
case where low precision happens to cost almost nothing is not held to float32 accuracy.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from models_zoo import VOCAB, tiny_model

import hf_seqpar

TOL_FACTOR = 4.0  # SP reorders low-precision sums (ring merge, shard boundaries): a few times the plain error
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}  # unit roundoff
EAGER_ONLY = {"gpt_oss", "gemma2"}
_GROUPS: dict = {}


def _docs():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in (9, 14, 5, 12)]


def _pack(features):
    ids = torch.cat([f["input_ids"] for f in features])[None]
    pos = torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


def _model(family, weights, lora, checkpointing):
    # what users get by default: SDPA, or eager for families without SDPA support (sinks, softcap)
    model = tiny_model(family, attn_implementation="eager" if family in EAGER_ONLY else "sdpa").to(weights)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, cfg)
        for name, param in model.named_parameters():  # LoRA B starts at 0: make every adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    return model


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])


def _plain(family, weights, autocast, lora, checkpointing):
    """Mean next-token loss over every document run alone, and the flat gradient."""
    model = _model(family, weights, lora, checkpointing)
    docs = _docs()
    total = torch.tensor(sum(len(d) - 1 for d in docs))
    loss = 0.0
    for doc in docs:
        with _autocast(autocast):
            out = model(input_ids=doc[None], labels=doc[None], num_items_in_batch=total)
        out.loss.backward()
        loss += out.loss.item()
    return loss, _grads(model)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _body_precision(family, mode, weights, autocast, lora, checkpointing):
    key = mode
    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), mode=mode)
    if key not in _GROUPS:
        _GROUPS[key] = hf_seqpar.init_groups(cfg)
    groups = _GROUPS[key]
    ref32_loss, ref32_grads = _plain(family, torch.float32, None, lora, checkpointing)
    low_loss, low_grads = _plain(family, weights, autocast, lora, checkpointing)

    model = hf_seqpar.apply_sequence_parallel(_model(family, weights, lora, checkpointing), config=cfg, groups=groups)
    batch = hf_seqpar.SequenceShardingCollator(_pack, config=cfg, groups=groups)([{"input_ids": d} for d in _docs()])
    n = (batch["shift_labels"] != -100).sum()
    dist.all_reduce(n)
    with _autocast(autocast):
        loss = model(**batch, num_items_in_batch=n).loss
    loss.backward()
    summed = loss.detach().float().clone()
    dist.all_reduce(summed)
    grads = _grads(model)
    dist.all_reduce(grads)

    def rel(a, b):
        return (a - b).norm().item() / b.norm().item()

    low_dtype = autocast or weights
    return {
        "loss_sp": abs(summed.item() - low_loss) / abs(low_loss),
        "loss_low": abs(low_loss - ref32_loss) / abs(ref32_loss),
        "grad_sp": rel(grads, low_grads),
        "grad_low": rel(low_grads, ref32_grads),
        "eps": EPS[low_dtype],
        "finite": bool(torch.isfinite(grads).all()),
    }


def _check(results):
    for rank, r in enumerate(results):
        assert r["finite"], f"rank {rank}: non-finite gradients"
        for what in ("loss", "grad"):
            bound = TOL_FACTOR * max(r[f"{what}_low"], r["eps"])
            assert r[f"{what}_sp"] <= bound, (
                f"rank {rank}: {what} SP vs plain {r[f'{what}_sp']:.2e} > {bound:.2e} ({r})"
            )


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [  # (family, mode, weights, autocast, lora, gradient checkpointing)
    ("llama", "ring", FP32, BF16, False, None),  # Trainer(bf16=True)
    ("llama", "ring", FP32, FP16, False, None),  # Trainer(fp16=True)
    ("llama", "ulysses", FP32, BF16, False, "non-reentrant"),
    ("llama", "ring", FP32, BF16, False, "reentrant"),
    ("llama", "allgather", FP32, FP16, False, "non-reentrant"),
    ("llama", "ring", BF16, None, False, None),  # bf16 weights
    ("llama", "ulysses", FP16, None, False, "reentrant"),  # fp16 weights
    ("llama", "ring", FP32, BF16, True, "non-reentrant"),  # LoRA, the TRL sft.py default path
    ("llama", "ulysses", BF16, None, True, "reentrant"),
    ("gpt_oss", "ring", FP32, BF16, False, None),  # sinks (float32 parameter) under autocast
    ("gemma2", "ulysses", FP32, BF16, False, None),  # softcap: the math kernel path under autocast
]


@pytest.mark.parametrize("family,mode,weights,autocast,lora,checkpointing", CASES)
def test_mixed_precision_parity(ranks, family, mode, weights, autocast, lora, checkpointing):
    _check(ranks.run(_body_precision, family, mode, weights, autocast, lora, checkpointing))


def test_mixed_qkv_dtypes_without_autocast_are_refused():
    groups = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
    cfg = hf_seqpar.SeqParConfig(sp_size=1, mode="ring")
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"hf_seqpar: q, k, v have dtypes torch.float32, torch.bfloat16"):
        hf_seqpar.sequence_parallel_attention(q, q.bfloat16(), q, config=cfg, groups=groups)


def test_autocast_output_dtype_is_what_sdpa_gives():
    groups = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
    cfg = hf_seqpar.SeqParConfig(sp_size=1, mode="ring")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=gen) for _ in range(3))
    v = v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = hf_seqpar.sequence_parallel_attention(q, k, v, config=cfg, groups=groups)
        theirs = torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=True
        )
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # bf16 inputs, float32 accumulation in both: equal up to one bf16 rounding of the output
    torch.testing.assert_close(ours.float(), theirs.transpose(1, 2).float(), rtol=8e-3, atol=8e-3)
