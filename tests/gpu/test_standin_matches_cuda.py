"""Each CPU stand-in (hf_seqpar/kernels/standin.py) against the real CUDA op it stands for, on the same inputs, so
the two cannot drift apart: outputs, lse (padding, empty rows, layout) and gradients, the FA2 window rules (a
left-only window whose open side is read as max_seqlen_k), and the input checks the CPU tests rely on.

Run on a GPU machine with `make gpu-check`; deselected by default.
"""

from __future__ import annotations

import pytest
import torch

from hf_seqpar.kernels import standin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _both(name, *args, **kwargs):
    """(real op's outputs, stand-in's outputs moved to the GPU)."""
    real = getattr(torch.ops.aten, name)(*args, **kwargs)
    with standin.cuda_standin():
        fake = getattr(standin, name)(*[_cpu(a) for a in args], **{k: _cpu(v) for k, v in kwargs.items()})
    return real, fake


def _same(real, fake, dtype, *, rows=None):
    """Equal within the dtype's rounding; infinities (empty rows) in the same places with the same sign."""
    real, fake = real.float(), fake.float().to(real.device)
    if rows is not None:
        real, fake = real[..., rows], fake[..., rows]
    assert torch.equal(torch.isposinf(real), torch.isposinf(fake)) and torch.equal(
        torch.isneginf(real), torch.isneginf(fake)
    )
    finite = torch.isfinite(real)
    torch.testing.assert_close(real[finite], fake[finite], atol=TOL[dtype], rtol=TOL[dtype])


# (cu_q, cu_k, max_q, max_k, causal, left, right): sequences with unequal lengths (bottom-right corners), an empty
# key sequence (filler), a left-only window narrower than the queries (the right side read as max_seqlen_k)
VARLEN = {
    "causal-unequal": ((0, 100, 164, 300), (0, 130, 164, 230), 136, 130, True, -1, -1),
    "filler": ((0, 40, 140), (0, 0, 90), 100, 90, True, -1, -1),
    "left-only-window": ((0, 200), (0, 30), 200, 30, False, 0, -1),
    "both-sides": ((0, 77, 177), (0, 90, 150), 100, 90, False, 12, 5),
    "wide-window": ((0, 64), (0, 64), 64, 64, True, 500, -1),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen_ops_match(case, dtype):
    cu_q, cu_k, max_q, max_k, causal, left, right = VARLEN[case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(cu_q[-1], 4, 64, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(max(cu_k[-1], 1), 2, 64, device="cuda", generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn_like(q)
    cq, ck = (torch.tensor(c, dtype=torch.int32, device="cuda") for c in (cu_q, cu_k))
    win = {"scale": 0.125, "window_size_left": left, "window_size_right": right}
    real, fake = _both("_flash_attention_forward", q, k, v, cq, ck, max_q, max_k, 0.0, causal, False, **win)
    _same(real[0], fake[0], dtype)
    _same(real[1], fake[1], dtype)
    lse = torch.where(torch.isinf(real[1]), 0.0, real[1]).contiguous()
    args = (dout, q, k, v, real[0], lse, cq, ck, max_q, max_k, 0.0, causal, real[2], real[3])
    real_g, fake_g = _both("_flash_attention_backward", *args, **win)
    for a, b in zip(real_g, fake_g, strict=True):
        _same(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq,lk,causal", [(96, 96, True), (40, 96, True), (96, 96, False)])
def test_sdpa_flash_ops_match(lq, lk, causal, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 4, lq, 64, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(2, 4, lk, 64, device="cuda", generator=gen).to(dtype) for _ in range(2))
    real, fake = _both("_scaled_dot_product_flash_attention", q, k, v, 0.0, causal, False, scale=0.125)
    _same(real[0], fake[0], dtype)
    _same(real[1], fake[1], dtype)
    assert real[0].stride() == fake[0].stride() and real[1].shape == fake[1].shape
    dout = torch.randn_like(real[0])
    args = (dout, q, k, v, real[0], real[1], real[2], real[3], lq, lk, 0.0, causal, real[6], real[7])
    real_g, fake_g = _both("_scaled_dot_product_flash_attention_backward", *args, scale=0.125)
    for a, b in zip(real_g, fake_g, strict=True):
        _same(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_efficient_ops_match(causal, dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    lq, lk = 37, 53  # odd lengths: lse padding, bias stride alignment, causal top-left with unequal lengths
    q = torch.randn(2, 4, lq, 64, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(2, 4, lk, 64, device="cuda", generator=gen).to(dtype) for _ in range(2))
    storage = torch.full((2, 1, lq, 64), float("-inf"), device="cuda", dtype=dtype)
    visible = torch.rand(2, 1, lq, lk, device="cuda", generator=gen) < 0.7
    visible[:, :, 3] = False  # a row that sees no key
    storage[..., :lk].masked_fill_(visible, 0.0)
    bias = storage[..., :lk].expand(2, 4, lq, lk)
    real, fake = _both("_scaled_dot_product_efficient_attention", q, k, v, bias, True, 0.0, causal, scale=0.125)
    _same(real[0], fake[0], dtype)
    assert real[1].shape == fake[1].shape  # [B, H, Lq rounded up to 32]
    _same(real[1], fake[1], dtype, rows=slice(0, lq))
    dout = torch.randn_like(real[0])
    lse = torch.where(torch.isinf(real[1]), 0.0, real[1])
    args = (dout, q, k, v, bias, real[0], lse, real[2], real[3], 0.0, [True, True, True, False], causal)
    real_g, fake_g = _both("_scaled_dot_product_efficient_attention_backward", *args, scale=0.125)
    for a, b in zip(real_g[:3], fake_g[:3], strict=True):
        _same(a, b, dtype)
    bad_lse = lse[..., :lq].contiguous()  # strides 37: the check the per-tile path failed on (issue 13)
    with pytest.raises(RuntimeError, match="LSE is not correctly aligned"):
        torch.ops.aten._scaled_dot_product_efficient_attention_backward(*args[:6], bad_lse, *args[7:], scale=0.125)
    with standin.cuda_standin(), pytest.raises(RuntimeError, match="LSE is not correctly aligned"):
        standin._scaled_dot_product_efficient_attention_backward(
            *[_cpu(a) for a in args[:6]], bad_lse.cpu(), *args[7:], scale=0.125
        )
