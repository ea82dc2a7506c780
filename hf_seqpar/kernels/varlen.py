"""One `VarlenRound` (kernels/plan.py) through a variable-length kernel: flash-attn or torch's vendored FA2 (on CPU,
their stand-ins: standin.py, which the planner's exactness tests run in float64).

Tensors are the flattened batch: q [total_q, H, D], k/v [total_k, Hkv, D]; lse is [H, total_q] as FA2 returns it.
"""

from __future__ import annotations

from . import _compat
from .plan import VarlenRound

IMPLS = ("flash_attn", "aten")


def varlen_fwd(impl: str, q, k, v, rnd: VarlenRound, *, scale: float, softcap: float | None):
    """-> (out [total_q, H, D] in q's dtype, lse [H, total_q] float32/64 with +inf on rows that saw no key)."""
    cu_q, cu_k = rnd.cu_tensors(q.device)
    window = {"scale": scale, "causal": rnd.causal, "left": rnd.left, "right": rnd.right}
    if impl == "flash_attn":
        return _compat.flash_varlen_forward(q, k, v, cu_q, cu_k, rnd.max_q, rnd.max_k, softcap=softcap, **window)
    if softcap is not None:
        raise NotImplementedError("hf_seqpar: torch's varlen flash kernel has no softcap; use backend='flash_attn'")
    return _compat.aten_varlen_forward(q, k, v, cu_q, cu_k, rnd.max_q, rnd.max_k, **window)


def varlen_bwd(impl: str, dout, q, k, v, out, lse, rnd: VarlenRound, *, scale: float, softcap: float | None):
    """Gradients of one round given the FINAL out (q's dtype) and lse ([H, total_q] float32, finite)."""
    cu_q, cu_k = rnd.cu_tensors(q.device)
    window = {"scale": scale, "causal": rnd.causal, "left": rnd.left, "right": rnd.right}
    args = (dout, q, k, v, out, lse, cu_q, cu_k, rnd.max_q, rnd.max_k)
    if impl == "flash_attn":
        return _compat.flash_varlen_backward(*args, softcap=softcap, **window)
    return _compat.aten_varlen_backward(*args, **window)
