"""One `VarlenRound` (kernels/plan.py) through a variable-length kernel: flash-attn, torch's vendored FA2, or a
reference with the same semantics written with tensor ops (any device and dtype; the planner's exactness tests
run it in float64 on CPU).

Tensors are the flattened batch: q [total_q, H, D], k/v [total_k, Hkv, D]; lse is [H, total_q] as FA2 returns it.
"""

from __future__ import annotations

import torch

from . import _compat, torch_backend
from .mask import BlockKind
from .plan import VarlenRound

IMPLS = ("flash_attn", "aten", "reference")


def _reference_mask(rnd: VarlenRound, nq: int, nk: int, device) -> torch.Tensor:
    """FA2's rule for one sequence, including its reading of windows >= max_seqlen_k as unbounded (so a plan that
    relies on a window FA2 would drop fails here too)."""
    left = -1 if rnd.left >= rnd.max_k else rnd.left
    right = -1 if rnd.right >= rnd.max_k else rnd.right
    qi = torch.arange(nq, device=device)[:, None]
    kj = torch.arange(nk, device=device)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= kj >= qi + (nk - nq) - left
    if right >= 0:
        allowed &= kj <= qi + (nk - nq) + right
    return allowed[None]


def _sequences(rnd: VarlenRound):
    for i in range(len(rnd.cu_q) - 1):
        yield rnd.cu_q[i], rnd.cu_q[i + 1], rnd.cu_k[i], rnd.cu_k[i + 1]


def _reference_fwd(q, k, v, rnd: VarlenRound, scale, softcap):
    h = q.shape[1]
    out = torch.zeros(q.shape[0], h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((h, q.shape[0]), float("inf"), dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for qa, qb, ka, kb in _sequences(rnd):
        if qa == qb or ka == kb:
            continue
        mask = _reference_mask(rnd, qb - qa, kb - ka, q.device)
        o, s = torch_backend.math_fwd(
            q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], BlockKind.MIXED, mask, scale, softcap
        )
        out[qa:qb] = o[0].to(out.dtype)
        lse[:, qa:qb] = torch.where(torch.isneginf(s[0]), float("inf"), s[0]).to(lse.dtype)  # FA2: +inf if empty
    return out, lse


def _reference_bwd(dout, q, k, v, out, lse, rnd: VarlenRound, scale, softcap):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qa, qb, ka, kb in _sequences(rnd):
        if qa == qb or ka == kb:
            continue
        mask = _reference_mask(rnd, qb - qa, kb - ka, q.device)
        grads = torch_backend.math_bwd(
            dout[None, qa:qb],
            q[None, qa:qb],
            k[None, ka:kb],
            v[None, ka:kb],
            out[None, qa:qb],
            lse[None, :, qa:qb],
            BlockKind.MIXED,
            mask,
            scale,
            softcap,
        )
        dq[qa:qb] = grads[0][0].to(dq.dtype)
        dk[ka:kb] = grads[1][0].to(dk.dtype)
        dv[ka:kb] = grads[2][0].to(dv.dtype)
    return dq, dk, dv


def varlen_fwd(impl: str, q, k, v, rnd: VarlenRound, *, scale: float, softcap: float | None):
    """-> (out [total_q, H, D] in q's dtype, lse [H, total_q] float32/64 with +inf on rows that saw no key)."""
    if impl == "reference":
        return _reference_fwd(q, k, v, rnd, scale, softcap)
    cu_q, cu_k = rnd.cu_tensors(q.device)
    window = {"scale": scale, "causal": rnd.causal, "left": rnd.left, "right": rnd.right}
    if impl == "flash_attn":
        return _compat.flash_varlen_forward(q, k, v, cu_q, cu_k, rnd.max_q, rnd.max_k, softcap=softcap, **window)
    if softcap is not None:
        raise NotImplementedError("hf_seqpar: torch's varlen flash kernel has no softcap; use backend='flash_attn'")
    return _compat.aten_varlen_forward(q, k, v, cu_q, cu_k, rnd.max_q, rnd.max_k, **window)


def varlen_bwd(impl: str, dout, q, k, v, out, lse, rnd: VarlenRound, *, scale: float, softcap: float | None):
    """Gradients of one round given the FINAL out (q's dtype) and lse ([H, total_q] float32, finite)."""
    if impl == "reference":
        return _reference_bwd(dout, q, k, v, out, lse, rnd, scale, softcap)
    cu_q, cu_k = rnd.cu_tensors(q.device)
    window = {"scale": scale, "causal": rnd.causal, "left": rnd.left, "right": rnd.right}
    args = (dout, q, k, v, out, lse, cu_q, cu_k, rnd.max_q, rnd.max_k)
    if impl == "flash_attn":
        return _compat.flash_varlen_backward(*args, softcap=softcap, **window)
    return _compat.aten_varlen_backward(*args, **window)
