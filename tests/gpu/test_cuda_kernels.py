"""CUDA kernels against the float64 math path on the same device: the varlen rounds through torch's vendored FA2
(backend "torch", fp16/bf16) and flash-attn (when installed), the per-tile path (float32), every mask kind, packed
rows, GQA, and the hops a ring rank computes (off-diagonal runs, filler sequences).

Run on a GPU machine with `make gpu-check` (or `pytest -m gpu tests/gpu`); deselected by default (no GPU in CI).
"""

from __future__ import annotations

import random

import pytest
import torch

from hf_seqpar.kernels import MaskSpec, attend_bwd, attend_fwd, varlen_impl
from hf_seqpar.kernels.plan import varlen_plan
from hf_seqpar.layout import Placement

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SEQ, HEADS, KV_HEADS, HEAD_DIM, BATCH = 2048, 8, 2, 64, 2
_rng = random.Random(0)
_DOCS = tuple([0, *sorted(_rng.sample(range(1, SEQ), 40)), SEQ])
_DOCS2 = tuple([0, *sorted(_rng.sample(range(1, SEQ), 7)), SEQ])
SPECS = {
    "causal": MaskSpec(causal=True),
    "full": MaskSpec(causal=False),
    "window": MaskSpec(causal=True, window=100),
    "window-full": MaskSpec(causal=False, window=77),
    "packed": MaskSpec(causal=True, docs=(_DOCS,)),
    "packed-rows": MaskSpec(causal=True, docs=(_DOCS, _DOCS2)),
    "packed-window": MaskSpec(causal=True, window=64, docs=(_DOCS,)),
}
PLACEMENT = Placement.build(SEQ, 4, "zigzag")
HOPS = {"diagonal": (0, 0), "after": (0, 1), "before": (2, 1), "whole": None}
# fp16/bf16 inputs with float32 accumulation: errors of a few ulps (bf16 2^-8) on values of order 1
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4}


def _runs(hop):
    if hop is None:
        whole = Placement.build(SEQ, 1, "contiguous").ranks[0]
        return whole, whole
    rank, source = hop
    return PLACEMENT.ranks[rank], PLACEMENT.ranks[source]


def _inputs(q_len, k_len):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(BATCH, q_len, HEADS, HEAD_DIM, device="cuda", generator=gen)
    k = torch.randn(BATCH, k_len, KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    v = torch.randn(BATCH, k_len, KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    dout = torch.randn(BATCH, q_len, HEADS, HEAD_DIM, device="cuda", generator=gen)
    return q, k, v, dout


@pytest.mark.parametrize("hop", list(HOPS))
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", torch.bfloat16), ("torch", torch.float16), ("torch", torch.float32), ("flash_attn", torch.bfloat16)],
)
def test_cuda_kernels_match_float64_math(spec, hop, backend, dtype):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    q_segs, k_segs = _runs(HOPS[hop])
    q, k, v, dout = _inputs(sum(s.length for s in q_segs), sum(s.length for s in k_segs))
    expected_impl = {"torch": "aten", "flash_attn": "flash_attn"}[backend] if dtype != torch.float32 else None
    assert varlen_impl(backend, q.to(dtype), v.to(dtype), None) == expected_impl
    kw = {"scale": HEAD_DIM**-0.5, "softcap": None}
    q64, k64, v64, d64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = attend_fwd(q64, k64, v64, q_segs, k_segs, SPECS[spec], backend="math", **kw)
    final_lse = torch.where(torch.isneginf(ref_lse), 0.0, ref_lse)
    ref_grads = attend_bwd(d64, q64, k64, v64, ref_out, final_lse, q_segs, k_segs, SPECS[spec], backend="math", **kw)
    qx, kx, vx, dx = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = attend_fwd(qx, kx, vx, q_segs, k_segs, SPECS[spec], backend=backend, **kw)
    ref_out_x = ref_out.to(dtype)  # the backward is given the final output in the inputs' dtype, as a ring does
    grads = attend_bwd(
        dx, qx, kx, vx, ref_out_x, final_lse.float(), q_segs, k_segs, SPECS[spec], backend=backend, **kw
    )
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    seen = torch.isfinite(ref_lse)  # rows that see no key: -inf in both
    assert torch.equal(torch.isfinite(lse), seen)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=tol, rtol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol * 4)


def test_softcap_through_flash_attn():
    pytest.importorskip("flash_attn")
    q_segs, k_segs = _runs(HOPS["diagonal"])
    q, k, v, _ = _inputs(sum(s.length for s in q_segs), sum(s.length for s in k_segs))
    kw = {"scale": HEAD_DIM**-0.5, "softcap": 5.0}
    ref, _ = attend_fwd(q.double(), k.double(), v.double(), q_segs, k_segs, SPECS["packed"], backend="math", **kw)
    got, _ = attend_fwd(
        *(t.bfloat16() for t in (q, k, v)), q_segs, k_segs, SPECS["packed"], backend="flash_attn", **kw
    )
    torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)


def test_packed_row_costs_a_handful_of_kernel_calls():
    # 128K tokens packed from 500 documents over 8 zigzag ranks: every hop is at most 4 varlen calls
    seq = 131072
    rng = random.Random(1)
    docs = (tuple([0, *sorted(rng.sample(range(1, seq), 499)), seq]),)
    placement = Placement.build(seq, 8, "zigzag")
    calls = [
        len(varlen_plan(placement.ranks[r], placement.ranks[s], MaskSpec(causal=True, docs=docs), 1))
        for r in range(8)
        for s in range(8)
    ]
    assert max(calls) <= 4, calls
