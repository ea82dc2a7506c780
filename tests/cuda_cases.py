"""The kernel cases of the CUDA path, shared by the GPU tests (tests/gpu, real ops) and the CPU stand-in tests
(test_cuda_standin.py, hf_seqpar/kernels/standin.py): every mask kind x every hop kind x every dispatch."""

from __future__ import annotations

import random

import torch

from hf_seqpar.kernels import MaskSpec, attend_bwd, attend_fwd
from hf_seqpar.layout import Placement


def specs(seq: int) -> dict[str, MaskSpec]:
    """Every mask kind at sequence length `seq` (windows and documents scale with it)."""
    rng = random.Random(0)
    docs = tuple([0, *sorted(rng.sample(range(1, seq), max(seq // 50, 4))), seq])
    docs2 = tuple([0, *sorted(rng.sample(range(1, seq), 7)), seq])
    chunk = seq // 5 + 3  # Llama-4 chunked attention: chunks from each document's start (here one document)
    return {
        "causal": MaskSpec(causal=True),
        "full": MaskSpec(causal=False),
        "window": MaskSpec(causal=True, window=seq // 20),
        "window-full": MaskSpec(causal=False, window=seq // 26),
        "packed": MaskSpec(causal=True, docs=(docs,)),
        "packed-rows": MaskSpec(causal=True, docs=(docs, docs2)),
        "packed-window": MaskSpec(causal=True, window=seq // 32, docs=(docs,)),
        "chunked": MaskSpec(causal=True, docs=(tuple(range(0, seq, chunk)) + (seq,),)),
    }


# The geometry of the bf16 ring bug (issue 13, gpu_2026-12.md), scaled by seq / 8192: a document crossing a zigzag
# chunk boundary with a window, so a hop's queries outnumber the keys it sees and the window cuts only on the left.
def issue_docs(seq: int) -> tuple[int, ...]:
    return tuple(round(x * seq / 8192) for x in (0, 700, 2500, 2501, 6000, 7999, 8192))


def issue_spec(seq: int) -> MaskSpec:
    return MaskSpec(causal=True, window=seq // 8, docs=(issue_docs(seq),))


def hops(seq: int) -> dict[str, tuple]:
    """(query runs, key runs) of the hops a rank computes: its own shard, a shard after / before it, the whole."""
    zigzag = Placement.build(seq, 4, "zigzag")
    whole = Placement.build(seq, 1, "contiguous").ranks[0]
    two = Placement.build(seq, 2, "zigzag")
    return {
        "diagonal": (zigzag.ranks[0], zigzag.ranks[0]),
        "after": (zigzag.ranks[0], zigzag.ranks[1]),
        "before": (zigzag.ranks[2], zigzag.ranks[1]),
        "whole": (whole, whole),
        "p2-cross": (two.ranks[0], two.ranks[1]),
    }


def inputs(batch, q_len, k_len, heads, kv_heads, dim, device, v_dim=None, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, device=device, generator=gen)
    k = torch.randn(batch, k_len, kv_heads, dim, device=device, generator=gen)
    v = torch.randn(batch, k_len, kv_heads, v_dim or dim, device=device, generator=gen)
    dout = torch.randn(batch, q_len, heads, v_dim or dim, device=device, generator=gen)
    return q, k, v, dout


def check_against_float64(q, k, v, dout, q_segs, k_segs, spec, *, backend, dtype, softcap=None, tol):
    """attend_fwd / attend_bwd in `dtype` through `backend` against the float64 math path on the same inputs."""
    kw = {"scale": q.shape[-1] ** -0.5, "softcap": softcap}
    q64, k64, v64, d64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = attend_fwd(q64, k64, v64, q_segs, k_segs, spec, backend="math", **kw)
    final_lse = torch.where(torch.isneginf(ref_lse), 0.0, ref_lse)
    ref_grads = attend_bwd(d64, q64, k64, v64, ref_out, final_lse, q_segs, k_segs, spec, backend="math", **kw)
    qx, kx, vx, dx = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = attend_fwd(qx, kx, vx, q_segs, k_segs, spec, backend=backend, **kw)
    # the backward is given the final output in the inputs' dtype, as a ring does
    grads = attend_bwd(
        dx, qx, kx, vx, ref_out.to(dtype), final_lse.float(), q_segs, k_segs, spec, backend=backend, **kw
    )
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    seen = torch.isfinite(ref_lse)  # rows that see no key: -inf in both
    assert torch.equal(torch.isfinite(lse), seen)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=tol, rtol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol * 4)
