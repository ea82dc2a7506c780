"""recompute_norms and recompute_lora_inputs (issue 15's cuts): the same loss and gradients as the path without them.

Reference: the same model (same seed) run the plain way. Both savings only move ops of the forward under
non-reentrant checkpointing, which recomputes the same ops on the same values in backward, so losses and gradients
are compared exactly (torch.equal), in float32 and with a bf16 base model under PEFT's float32 adapters (the case the
LoRA saving is for). The memory side is benchmarks/memory_breakdown.py's (BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch
from models_zoo import VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.memory import STATE_ATTR, apply_memory_savings, remove_memory_savings

CUTS = dict(recompute_norms=True, recompute_lora_inputs=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dtype, *, ckpt, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama").to(dtype).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config)  # PEFT keeps the adapters float32 on a bf16 base (autocast_adapter_dtype)


def _step(model, seed=5):
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(seed)  # the dropout masks
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "dtype,ckpt,dropout,savings",
    [
        (torch.float32, True, 0.0, CUTS),
        (torch.bfloat16, True, 0.0, CUTS),
        pytest.param(torch.bfloat16, False, 0.1, CUTS, marks=pytest.mark.slow),  # dropout's RNG replayed
        pytest.param(
            torch.bfloat16,
            True,
            0.0,
            {**CUTS, "chunked_loss": True, "tiled_mlp": True, "offload_checkpoints": True},
            marks=pytest.mark.slow,
        ),  # fmt: skip
    ],
)
def test_recomputed_norms_and_lora_inputs_are_exact(dtype, ckpt, dropout, savings):
    without = {k: v for k, v in savings.items() if k not in CUTS}  # the path without the cuts, other savings on
    reference = apply_memory_savings(_model(dtype, ckpt=ckpt, dropout=dropout), hf_seqpar.SeqParConfig(**without))
    ref_loss, ref_grads = _step(reference)
    model = apply_memory_savings(_model(dtype, ckpt=ckpt, dropout=dropout), hf_seqpar.SeqParConfig(**savings))
    base = model.get_base_model()
    patched = {type(m).__name__ for m, *_ in getattr(base, STATE_ATTR).patched}
    assert {"LlamaRMSNorm", "Linear"} <= patched
    loss, grads = _step(model)
    assert torch.equal(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads), [
        n for n in ref_grads if not torch.equal(grads[n], ref_grads[n])
    ]
    remove_memory_savings(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_lora_input_copy_is_no_longer_saved():
    """What the saving is for: the float32 copy of an adapted linear's input is not among the saved tensors."""
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    for savings in ({}, {"recompute_lora_inputs": True, "recompute_norms": True}):
        model = apply_memory_savings(_model(torch.bfloat16, ckpt=False), hf_seqpar.SeqParConfig(**savings))
        ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        hidden_fp32 = sum(1 for dtype, shape in saved if dtype == torch.float32 and shape == (1, 24, 64))
        if not savings:
            assert hidden_fp32 >= 8  # q, k, v, o, gate, up inputs and the norms' float32 copies, per layer
        else:
            assert hidden_fp32 == 0
    with pytest.raises(ValueError, match="recompute_norms='yes' must be True or False"):
        hf_seqpar.SeqParConfig(recompute_norms="yes")
    assert hf_seqpar.SeqParConfig.from_env({"HF_SEQPAR_RECOMPUTE_LORA_INPUTS": "1"}).recompute_lora_inputs
