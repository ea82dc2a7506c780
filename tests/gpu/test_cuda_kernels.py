"""CUDA block kernels (flash / memory-efficient SDPA, flash-attn when installed) against the float64 math path.

Run on a GPU machine with `pytest -m gpu tests/gpu`; deselected by default (no GPU in CI).
"""

from __future__ import annotations

import pytest
import torch

from hf_seqpar.kernels import MaskSpec, attend_bwd, attend_fwd
from hf_seqpar.layout import Segment

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SEQ, HEADS, KV_HEADS, HEAD_DIM = 1024, 8, 2, 64
SPECS = {
    "causal": MaskSpec(causal=True),
    "full": MaskSpec(causal=False),
    "window": MaskSpec(causal=True, window=100),
    "packed": MaskSpec(causal=True, docs=((0, 100, 612, 613, 1024),)),
}
# bf16 inputs with float32 accumulation: errors of a few bf16 ulps (2^-8) on values of order 1
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "flash_attn"])
def test_cuda_block_kernels_match_math(spec, dtype, backend):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
        if dtype == torch.float32:
            pytest.skip("flash-attn has no float32 kernels")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, SEQ, HEADS, HEAD_DIM, device="cuda", generator=gen)
    k = torch.randn(1, SEQ, KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    v = torch.randn(1, SEQ, KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    dout = torch.randn(1, SEQ, HEADS, HEAD_DIM, device="cuda", generator=gen)
    runs = (Segment(0, SEQ // 2), Segment(SEQ // 2, SEQ // 2))
    kw = {"scale": HEAD_DIM**-0.5, "softcap": None}
    q64, k64, v64, d64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = attend_fwd(q64, k64, v64, runs, runs, SPECS[spec], backend="math", **kw)
    ref_grads = attend_bwd(d64, q64, k64, v64, ref_out, ref_lse, runs, runs, SPECS[spec], backend="math", **kw)
    qx, kx, vx, dx = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = attend_fwd(qx, kx, vx, runs, runs, SPECS[spec], backend=backend, **kw)
    grads = attend_bwd(dx, qx, kx, vx, out, lse, runs, runs, SPECS[spec], backend=backend, **kw)
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=TOL[dtype], rtol=TOL[dtype])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)
