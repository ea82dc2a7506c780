"""Simulated ranks (one device, lockstep, copies for the collectives): exact against plain attention in float64,
forward and backward, for every mode, with the tile kernels and with the varlen planner (CUDA stand-in). The
attention-efficiency benchmark and the single-GPU tests stand on this."""

from __future__ import annotations

import pytest
import torch
from reference import attention

from hf_seqpar.algorithms.ring import AttnArgs
from hf_seqpar.algorithms.simulate import simulate
from hf_seqpar.kernels import MaskSpec, standin

SEQ, HEADS, KV_HEADS, DIM = 48, 4, 2, 8
DOCS = (0, 7, 20, 21, 40, SEQ)


CASES = [("ring", 4, 1), ("allgather", 4, 1), ("ulysses", 2, 1), ("usp", 4, 2), ("ring", 3, 1)]


@pytest.mark.parametrize(
    "mode,world,ulysses,backend",
    [(*case, "flash_attn") for case in CASES] + [("ring", 4, 1, "torch"), ("usp", 4, 2, "torch")],
)
def test_simulated_ranks_are_exact(one_thread, mode, world, ulysses, backend):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, SEQ, HEADS, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, SEQ, KV_HEADS, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, SEQ, KV_HEADS, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, SEQ, HEADS, DIM, generator=gen, dtype=torch.float64)
    ref = attention(q, k, v, causal=True, window=9, cu_seqlens_rows=[DOCS])
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    args = AttnArgs(spec=MaskSpec(causal=True, window=9, docs=(DOCS,)), scale=DIM**-0.5, softcap=None, backend=backend)
    layout = "contiguous" if world == 3 else "zigzag"
    # "flash_attn": the varlen plans through the CUDA stand-in (float64 allowed there for exactness)
    with standin.cuda_standin(enabled=backend == "flash_attn", flash_attn=True, float64=True):
        got = simulate(
            q.detach(),
            k.detach(),
            v.detach(),
            mode=mode,
            world=world,
            args=args,
            layout=layout,
            ulysses=ulysses,
            dout=dout,
        )
    # float64 throughout: agreement to rounding (measured ~1e-15)
    torch.testing.assert_close(got["out"], ref.detach(), rtol=0, atol=1e-12)
    for a, b in zip(got["grads"], ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(got["fwd_seconds"]) == world and min(got["bwd_seconds"]) > 0
