"""CUDA kernels against the float64 math path on the same device: the varlen rounds through torch's vendored FA2
(backend "torch", fp16/bf16) and flash-attn (when installed), the per-tile path (float32), every mask kind, packed
rows, GQA, and the hops a ring rank computes (off-diagonal runs, filler sequences).

Run on a GPU machine with `make gpu-check` (or `pytest -m gpu tests/gpu`); deselected by default (no GPU in CI).
"""

from __future__ import annotations

import random

import pytest
import torch
from cuda_cases import check_against_float64, hops, inputs, issue_spec, specs

from hf_seqpar.kernels import MaskSpec, attend_fwd, varlen_impl
from hf_seqpar.kernels.plan import varlen_plan
from hf_seqpar.layout import Placement

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SEQ, HEADS, KV_HEADS, HEAD_DIM, BATCH = 2048, 8, 2, 64, 2
SPECS = {**specs(SEQ), "issue": issue_spec(SEQ)}
HOPS = hops(SEQ)
# fp16/bf16 inputs with float32 accumulation: errors of a few ulps (bf16 2^-8) on values of order 1
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4}


def _inputs(q_len, k_len, v_dim=None):
    return inputs(BATCH, q_len, k_len, HEADS, KV_HEADS, HEAD_DIM, "cuda", v_dim=v_dim)


@pytest.mark.parametrize("hop", list(HOPS))
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", torch.bfloat16), ("torch", torch.float16), ("torch", torch.float32), ("flash_attn", torch.bfloat16)],
)
def test_cuda_kernels_match_float64_math(spec, hop, backend, dtype):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    q_segs, k_segs = HOPS[hop]
    q, k, v, dout = _inputs(sum(s.length for s in q_segs), sum(s.length for s in k_segs))
    expected_impl = {"torch": "aten", "flash_attn": "flash_attn"}[backend] if dtype != torch.float32 else None
    assert varlen_impl(backend, q.to(dtype), v.to(dtype), None) == expected_impl
    check_against_float64(q, k, v, dout, q_segs, k_segs, SPECS[spec], backend=backend, dtype=dtype, tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_head_dims_through_the_tile_path(dtype):
    q_segs, k_segs = HOPS["after"]
    q, k, v, dout = _inputs(sum(s.length for s in q_segs), sum(s.length for s in k_segs), v_dim=32)
    check_against_float64(
        q, k, v, dout, q_segs, k_segs, SPECS["packed-window"], backend="torch", dtype=dtype, tol=TOL[dtype]
    )


def test_softcap_through_flash_attn():
    pytest.importorskip("flash_attn")
    q_segs, k_segs = HOPS["diagonal"]
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
