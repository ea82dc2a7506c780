"""recompute_norms and recompute_lora_inputs (issue 15's cuts): the same loss and gradients as the path without them.

Reference: the same model (same seed) run the plain way. recompute_lora_inputs moves ops of the forward under
non-reentrant checkpointing, which recomputes the same ops on the same values in backward; recompute_norms runs each
RMSNorm over sequence chunks (hf_seqpar.memory.chunked_rowwise), recomputed and differentiated one chunk at a time,
and every value of a chunk is computed by the same ops on the same row. So with a bf16 base model under PEFT's
float32 adapters (the case the savings are for) losses and gradients are compared exactly (torch.equal). In float32
the norm's input gradient meets the residual stream's in another order (`x.to(float32)` is x itself there, so the
plain graph adds the norm's two terms and the residual's in one buffer), and a trainable norm weight's gradient is
summed chunk by chunk: equal to float rounding. The norm alone is compared with the plain module and with float64, and
its backward's peak is measured here; the model's is benchmarks/memory_breakdown.py's (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from models_zoo import VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.memory import STATE_ATTR, apply_memory_savings, remove_memory_savings
from hf_seqpar.memory import chunked_rowwise

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


def _assert_grads(grads, ref_grads, *, exact):
    assert sorted(grads) == sorted(ref_grads)
    if exact:
        bad = [n for n in ref_grads if not torch.equal(grads[n], ref_grads[n])]
    else:  # float32 sums in another order (module docstring): a few ulps of the largest value
        bad = [n for n in ref_grads if not torch.allclose(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6)]
    assert not bad, bad


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
    _assert_grads(grads, ref_grads, exact=dtype == torch.bfloat16)
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


# ---- the chunked norm: the module's values, its backward's peak ----------------------------------------------------

HIDDEN = 64


def _norm(kind, dtype, hidden=HIDDEN):
    """Llama's RMSNorm (weight * x.to(input dtype)) or Gemma's ((x * (1 + weight)) in float32, then cast)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}[kind](hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(2))
    return norm.to(dtype)


def _norm_grads(norm, x, grad_y, *, chunk_positions=None, autocast=False):
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if chunk_positions is None:
            y = norm(x)
        else:  # chunks of chunk_positions positions along the sequence (x: [batch, seq, hidden])
            elements = chunk_positions * x.shape[0] * x.shape[-1]
            y = chunked_rowwise(norm.forward, x, list(norm.parameters()), chunk_elements=elements)
        return (y, *torch.autograd.grad(y, (x, norm.weight), grad_y))


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_chunked_norm_is_the_module(kind, dtype, autocast):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 37, HIDDEN, generator=gen)).to(dtype)  # chunks of 5 positions: a short last one
    grad_y = torch.randn(2, 37, HIDDEN, generator=gen).to(dtype)  # and each a non-contiguous [2, 5, 64] view
    norm = _norm(kind, dtype)
    y_ref, gx_ref, gw_ref = _norm_grads(norm, x, grad_y, autocast=autocast)
    y, gx, gw = _norm_grads(norm, x, grad_y, chunk_positions=5, autocast=autocast)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)  # the same ops on the same rows
    # the weight's gradient sums 74 rows: chunk by chunk in float32, so to rounding of the weight's dtype
    ulp = torch.finfo(dtype).eps * gw_ref.abs().max()
    assert gw.dtype == gw_ref.dtype and (gw - gw_ref).abs().max() <= 2 * ulp
    # and both are float64's to the rounding of their dtype (bf16: 8 bits, on values of norm ~3)
    y64, gx64, gw64 = _norm_grads(copy.deepcopy(norm).double(), x.double(), grad_y.double())
    tol = 1e-5 if dtype == torch.float32 and not autocast else 2**-6
    for got, ref, ref64 in ((y, y_ref, y64), (gx, gx_ref, gx64), (gw, gw_ref, gw64)):
        scale = ref64.abs().max()
        assert (got.double() - ref64).abs().max() <= tol * scale
        assert (ref.double() - ref64).abs().max() <= tol * scale


def _checkpointed_norm_grads(norm, x, grad_y):
    """The recompute_norms before chunking: the whole norm under non-reentrant checkpointing."""
    from torch.utils.checkpoint import checkpoint

    return torch.autograd.grad(checkpoint(norm, x, use_reentrant=False), x, grad_y)


def test_chunked_norm_backward_holds_one_chunk_of_float32(one_thread):
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from memory import LiveTensorBytes  # benchmarks/memory.py's counter of live tensor storages

    rows, hidden, chunk_rows = 4096, 256, 256
    norm = _norm("llama", torch.bfloat16, hidden)
    norm.weight.requires_grad_(False)  # as under LoRA
    x = torch.randn(1, rows, hidden, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn_like(x)
    float32_copy, chunk32 = rows * hidden * 4, chunk_rows * hidden * 4
    y = chunked_rowwise(norm.forward, x, [], chunk_elements=chunk_rows * hidden)
    with LiveTensorBytes() as live:
        (grad_x,) = torch.autograd.grad(y, x, grad_y)
    chunked = live.peak
    with LiveTensorBytes() as live:
        (grad_ref,) = _checkpointed_norm_grads(norm, x, grad_y)
    assert torch.equal(grad_x, grad_ref)
    assert live.peak >= 5 * float32_copy  # x's float32 copy, the normalized values and their gradients, at once
    assert chunked <= grad_x.nbytes + 8 * chunk32, (chunked, live.peak)  # dx (bf16) + one chunk's temporaries


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: (1 + weight) norms, q / k norms on [B, H, S, D]
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_norms_in_a_checkpointed_model(family, autocast, one_thread):
    """Full fine-tuning (the norms' weights train), float32 weights, with and without bf16 autocast."""
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for savings in ({}, {"recompute_norms": True}):
        model = tiny_model(family)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_memory_savings(model, hf_seqpar.SeqParConfig(**savings), norm_chunk_rows=5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    norms = [m for m in model.model.modules() if type(m).__name__.endswith("RMSNorm")]
    patched = [m for m, *_ in getattr(model, STATE_ATTR).patched]
    assert norms and all(any(m is n for m in patched) for n in norms)
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)
    _assert_grads(grads, ref_grads, exact=False)
