"""The CUDA path on CPU: the kernel dispatch, plans and op calls the package makes on a GPU, run through the CPU
stand-ins of the CUDA ops (hf_seqpar/kernels/standin.py), against float64 attention. Every mask kind x hop kind x
dispatch (torch's FA2 varlen, flash-attn varlen, the per-tile SDPA path) and simulated ranks of every mode at
P = 2, 4, 8 in bf16 and fp32. The two bugs of the first GPU run reproduce here without the fixes:
- fp32 with documents or a window: the efficient-attention backward's LSE alignment check;
- bf16 ring with documents AND a window: FA2 reading a left-only window's unbounded right side as max_seqlen_k.
"""

from __future__ import annotations

import pytest
import torch
from cuda_cases import check_against_float64, hops, inputs, issue_spec, specs

from hf_seqpar.algorithms.ring import AttnArgs
from hf_seqpar.algorithms.simulate import simulate
from hf_seqpar.kernels import attend_bwd, attend_fwd, resolve_backend, standin, varlen_impl
from hf_seqpar.kernels.plan import varlen_plan

SEQ, HEADS, KV_HEADS, DIM, BATCH = 384, 4, 2, 16, 2
# fp16/bf16 inputs, float32 accumulation: a few ulps (bf16 2^-8) of values of order 1; fp32: the per-tile merges
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-5}
DISPATCH = {  # name -> (backend, dtype, the varlen kernel the dispatch must pick, flash-attn installed)
    "aten-bf16": ("torch", torch.bfloat16, "aten", False),
    "aten-fp16": ("torch", torch.float16, "aten", False),
    "tiles-fp32": ("torch", torch.float32, None, False),
    "flash_attn-bf16": ("flash_attn", torch.bfloat16, "flash_attn", True),
    "cudnn-bf16": ("cudnn", torch.bfloat16, None, False),  # unmasked tiles by cuDNN, masked ones by torch
    "cudnn-fp16": ("cudnn", torch.float16, None, False),
}
HOPS = hops(SEQ)


@pytest.mark.parametrize("dispatch", list(DISPATCH))
@pytest.mark.parametrize("mask", [*specs(SEQ), "issue"])
def test_every_dispatch_matches_float64(one_thread, dispatch, mask):
    backend, dtype, impl, flash = DISPATCH[dispatch]
    spec = issue_spec(SEQ) if mask == "issue" else specs(SEQ)[mask]
    with standin.cuda_standin(flash_attn=flash):
        for _hop, (q_segs, k_segs) in HOPS.items():
            lq, lk = sum(s.length for s in q_segs), sum(s.length for s in k_segs)
            q, k, v, dout = inputs(BATCH, lq, lk, HEADS, KV_HEADS, DIM, "cpu")
            assert varlen_impl(backend, q.to(dtype), v.to(dtype), None) == impl
            check_against_float64(q, k, v, dout, q_segs, k_segs, spec, backend=backend, dtype=dtype, tol=TOL[dtype])


@pytest.mark.parametrize("dispatch", ["flash_attn-bf16", "aten-bf16", "tiles-fp32"])
def test_softcap_and_mla_head_dims(one_thread, dispatch):
    # softcap: flash-attn's varlen kernel takes it; torch's has none, so that dispatch falls back to the math tiles.
    # MLA (value head_dim 8 against q/k 16): no varlen kernel, the per-tile path.
    backend, dtype, _, flash = DISPATCH[dispatch]
    spec = specs(SEQ)["packed-window"]
    with standin.cuda_standin(flash_attn=flash):
        for hop in ("after", "whole"):
            q_segs, k_segs = HOPS[hop]
            lq, lk = sum(s.length for s in q_segs), sum(s.length for s in k_segs)
            q, k, v, dout = inputs(BATCH, lq, lk, HEADS, KV_HEADS, DIM, "cpu")
            check_against_float64(
                q, k, v, dout, q_segs, k_segs, spec, backend=backend, dtype=dtype, softcap=5.0, tol=TOL[dtype]
            )
            q, k, v, dout = inputs(BATCH, lq, lk, HEADS, KV_HEADS, DIM, "cpu", v_dim=8)
            assert varlen_impl(backend, q.to(dtype), v.to(dtype), None) is None
            check_against_float64(q, k, v, dout, q_segs, k_segs, spec, backend=backend, dtype=dtype, tol=TOL[dtype])


def test_float32_tiles_pass_the_efficient_backward_lse_check():
    # Bug 1 of the GPU run: per-tile lse slices of odd lengths failed "LSE is not correctly aligned (strideH)".
    q_segs, k_segs = HOPS["diagonal"]
    q, k, v, dout = inputs(BATCH, SEQ // 2, SEQ // 2, HEADS, KV_HEADS, DIM, "cpu")
    with standin.cuda_standin():
        out, lse = attend_fwd(q, k, v, q_segs, k_segs, specs(SEQ)["packed"], scale=0.25, softcap=None, backend="torch")
        attend_bwd(dout, q, k, v, out, lse, q_segs, k_segs, specs(SEQ)["packed"], scale=0.25, softcap=None,
                   backend="torch")  # fmt: skip


def test_standin_keeps_the_real_checks():
    q = torch.randn(1, 4, 40, 16)  # [B, H, L, D]
    with standin.cuda_standin():
        out, lse = standin._scaled_dot_product_efficient_attention(q, q, q, None, True, 0.0, True)[:2]
        assert lse.shape == (1, 4, 64) and out.stride() == (40 * 4 * 16, 16, 64, 1)  # lse rows rounded up to 32
        with pytest.raises(RuntimeError, match="LSE is not correctly aligned"):
            standin._scaled_dot_product_efficient_attention_backward(
                out, q, q, q, None, out, lse[..., :37].contiguous(), None, None, 0.0, [True] * 4, True
            )
        with pytest.raises(RuntimeError, match="fp16 and bf16"):
            standin._scaled_dot_product_flash_attention(q, q, q)


def test_fa2_window_rules():
    # a left-only window's right side becomes max_seqlen_k (set_params_fprop), not unbounded
    assert standin.fa2_window(False, 5, -1, 100, 40, forward=True) == (False, 5, 40)
    assert standin.fa2_window(True, -1, -1, 100, 40, forward=True) == (True, 40, 0)  # causal ignores left
    assert standin.fa2_window(False, 50, -1, 100, 40, forward=True) == (False, -1, -1)  # left >= max_k: unbounded
    assert standin.fa2_window(True, 7, -1, 1, 40, forward=True) == (False, 7, 40)  # one query row: not causal


def test_plans_stay_inside_fa2_rules():
    # Every varlen round of every hop of the issue's geometry: a left-bounded, right-open round must have
    # max_seqlen_k >= its longest query sequence - 1, or FA2 cuts the right side (bug 2 of the GPU run).
    from hf_seqpar.layout import Placement

    seq = 8192
    for world in (2, 4, 8):
        placement = Placement.build(seq, world, "zigzag")
        for r in range(world):
            for s in range(world):
                for rnd in varlen_plan(placement.ranks[r], placement.ranks[s], issue_spec(seq), 1):
                    causal, left, right = standin.fa2_window(
                        rnd.causal, rnd.left, rnd.right, rnd.max_q, rnd.max_k, forward=True
                    )
                    if left >= 0 and right >= 0:
                        longest = max(b - a for a, b in zip(rnd.cu_q, rnd.cu_q[1:], strict=False))
                        assert rnd.right >= 0 or right >= longest - 1, (world, r, s, rnd)


def test_auto_picks_per_mask_dtype_and_device(monkeypatch):
    # the auto table: cuDNN for dense half-precision masks, FA2 varlen for documents and windows, torch for fp32
    from hf_seqpar.kernels import registry

    q = torch.randn(1, 64, 4, 16)
    with standin.cuda_standin(flash_attn=True):
        assert registry.pick("auto", q.bfloat16(), specs(SEQ)["causal"]) == "cudnn"
        assert registry.pick("auto", q.bfloat16(), specs(SEQ)["packed"]) == "flash_attn"
        assert registry.pick("auto", q.bfloat16(), specs(SEQ)["window"]) == "flash_attn"
        assert registry.pick("auto", q, specs(SEQ)["causal"]) == "torch"
    with standin.cuda_standin(cudnn=False):
        assert registry.pick("auto", q.bfloat16(), specs(SEQ)["causal"]) == "torch"
    assert registry.pick("auto", q.bfloat16(), specs(SEQ)["causal"]) == "torch"  # CPU
    with pytest.raises(ValueError, match="backend='cudnn' needs"):
        resolve_backend("cudnn", q)
    # the cuDNN ops really serve the dense hops
    calls = []
    real = standin._scaled_dot_product_cudnn_attention
    monkeypatch.setattr(
        standin, "_scaled_dot_product_cudnn_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    with standin.cuda_standin():
        q_segs, k_segs = HOPS["after"]
        attend_fwd(q.bfloat16(), q.bfloat16(), q.bfloat16(), q_segs[:1], q_segs[:1], specs(SEQ)["causal"], scale=0.25,
                   softcap=None, backend="auto")  # fmt: skip
    assert calls


MODES = [("ring", 1), ("allgather", 1), ("ulysses", None), ("usp", 2)]


@pytest.mark.parametrize("mask", ["issue", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("mode,ulysses", MODES)
def test_simulated_ranks_match_float64(one_thread, mode, ulysses, world, dtype, mask):
    # The issue's own reproduction (documents + window, FA2 varlen in bf16), scaled down; and a dense causal row
    # (cuDNN tiles in bf16, picked by 'auto'). At P=2 usp is plain Ulysses.
    seq, heads, kv_heads, dim = 512, 8, 2, 16
    ulysses = world if ulysses is None else min(ulysses, world)
    spec = issue_spec(seq) if mask == "issue" else specs(seq)["causal"]
    q, k, v, dout = (t.double() for t in inputs(1, seq, seq, heads, kv_heads, dim, "cpu"))
    ref = simulate(
        q, k, v, mode="ring", world=1, args=AttnArgs(spec=spec, scale=0.25, softcap=None, backend="math"), dout=dout,
        timed=False,
    )  # fmt: skip
    with standin.cuda_standin():
        args = AttnArgs(spec=spec, scale=0.25, softcap=None, backend=resolve_backend("auto", q.to(dtype)))
        got = simulate(
            *(t.to(dtype) for t in (q, k, v)), mode=mode, world=world, args=args, ulysses=ulysses,
            dout=dout.to(dtype), timed=False,
        )  # fmt: skip
    tol = TOL[dtype] * (1 if dtype == torch.bfloat16 else 5)  # fp32: P-way merges and sums of rounded partials
    torch.testing.assert_close(got["out"].double(), ref["out"], atol=tol, rtol=tol)
    for a, b in zip(got["grads"], ref["grads"], strict=True):
        torch.testing.assert_close(a.double(), b, atol=tol * 3, rtol=tol * 3)
