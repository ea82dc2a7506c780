"""Attention of query runs against key runs, following a host-side plan built once per (runs, mask, batch).

Two ways through, picked per call by the backend (registry.py; 'auto' from the mask, dtype and device):
- varlen (CUDA, fp16/bf16): a few variable-length flash calls per call whatever the number of packed documents,
  windows and softcap native (flash-attn), GQA without expanding K/V;
- tiles (CPU, float32 on CUDA, cuDNN, the exact math path): one kernel call per tile of `block_plan`, the kernel
  chosen per tile by the backend (cuDNN takes unmasked tiles, torch's fused kernels the rest, math what they cannot).
Results are merged in the accumulation dtype, into the caller's accumulators when it passes them (`into`), so a
ring merges each hop once.
"""

from __future__ import annotations

import torch

from . import registry, varlen
from .mask import BlockKind, MaskSpec
from .merge import acc_dtype, merge_into
from .plan import block_plan, varlen_plan


def resolve_backend(backend: str, q: torch.Tensor | None = None) -> str:
    """Check a backend name (and that this machine has it); 'auto' stays 'auto' and is resolved per call from the
    mask, dtype and device (registry.pick)."""
    return registry.check(backend)


def varlen_impl(backend: str, q: torch.Tensor, v: torch.Tensor, softcap: float | None, spec: MaskSpec | None = None):
    """Which varlen kernel serves this call, or None for the per-tile path."""
    name = registry.pick(backend, q, spec if spec is not None else MaskSpec())
    return registry.module(name).varlen_impl(q, v, softcap)


def _row_pieces(start: int, stop: int, length: int):
    """Rows [start, stop) of a flattened [batch * length] tensor -> (batch row, from, to, offset into the range)."""
    pos = start
    while pos < stop:
        b, a = divmod(pos, length)
        end = min(stop, (b + 1) * length)
        yield b, a, a + end - pos, pos - start
        pos = end


def _varlen_fwd(impl, q, k, v, q_segs, k_segs, spec, scale, softcap, out, lse):
    b, lq, h, _ = q.shape
    qf, kf, vf = q.reshape(b * lq, h, -1), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    fresh = out is None
    if fresh:
        out = torch.zeros(b, lq, h, v.shape[-1], dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full((b, h, lq), float("-inf"), dtype=out.dtype, device=q.device)
    for rnd in varlen_plan(q_segs, k_segs, spec, b):
        (qa, qb), (ka, kb) = rnd.q_range, rnd.k_range
        blk_out, blk_lse = varlen.varlen_fwd(impl, qf[qa:qb], kf[ka:kb], vf[ka:kb], rnd, scale=scale, softcap=softcap)
        blk_lse = torch.where(torch.isposinf(blk_lse), float("-inf"), blk_lse).to(out.dtype)  # FA2: +inf = empty
        for row, a, z, off in _row_pieces(qa, qb, lq):
            o, s = blk_out[off : off + z - a], blk_lse[:, off : off + z - a]
            if fresh:  # untouched rows are (0, -inf): merging into them is a copy
                out[row, a:z] = o
                lse[row, :, a:z] = s
            else:
                merge_into(out[row : row + 1, a:z], lse[row : row + 1, :, a:z], o[None], s[None])
        fresh = False
    return out, lse


def attend_fwd(
    q, k, v, q_segs, k_segs, spec: MaskSpec, *, scale: float, softcap: float | None, backend: str, into=None
):
    """q [B, Lq, H, D] against k, v [B, Lk, Hkv, Dv] -> (out, lse): out [B, Lq, H, Dv] and lse [B, H, Lq] in the
    accumulation dtype. Rows that see no key get (0, -inf). With `into=(out, lse)` the result is merged into those
    accumulators (in place) and they are returned."""
    out, lse = into if into is not None else (None, None)
    chosen = registry.module(registry.pick(backend, q, spec))
    impl = chosen.varlen_impl(q, v, softcap)
    if impl is not None:
        return _varlen_fwd(impl, q, k, v, q_segs, k_segs, spec, scale, softcap, out, lse)
    b, lq, h, _ = q.shape
    if out is None:
        out = torch.zeros(b, lq, h, v.shape[-1], dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full((b, h, lq), float("-inf"), dtype=out.dtype, device=q.device)
    for qi, ki, kind, qs, ks in block_plan(q_segs, k_segs, spec):
        mask = spec.dense(qs, ks, q.device) if kind is BlockKind.MIXED else None
        kernel = chosen.tile_kernel(q, v, softcap, kind)
        blk_out, blk_lse = kernel.fwd(q[:, qi], k[:, ki], v[:, ki], kind, mask, scale, softcap)
        merge_into(out[:, qi], lse[:, :, qi], blk_out, blk_lse.to(out.dtype))
    return out, lse


def _varlen_bwd(impl, dout, q, k, v, out, lse, q_segs, k_segs, spec, scale, softcap, grads):
    b, lq, h, _ = q.shape
    dq, dk, dv = grads
    qf, kf, vf = q.reshape(b * lq, h, -1), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    dq_f, dk_f, dv_f = dq.view(qf.shape), dk.view(kf.shape), dv.view(vf.shape)
    dout_f = dout.to(q.dtype).reshape(b * lq, h, -1)
    out_f = out.to(q.dtype).reshape(b * lq, h, -1)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)  # rows that saw no key: any finite value, their grads are 0
    lse_f = safe.to(acc_dtype(q.dtype)).permute(1, 0, 2).reshape(h, b * lq)  # FA2 layout [H, B * Lq]
    for rnd in varlen_plan(q_segs, k_segs, spec, b):
        (qa, qb), (ka, kb) = rnd.q_range, rnd.k_range
        g_q, g_k, g_v = varlen.varlen_bwd(
            impl,
            dout_f[qa:qb].contiguous(),
            qf[qa:qb],
            kf[ka:kb],
            vf[ka:kb],
            out_f[qa:qb].contiguous(),
            lse_f[:, qa:qb].contiguous(),
            rnd,
            scale=scale,
            softcap=softcap,
        )
        dq_f[qa:qb] += g_q
        dk_f[ka:kb] += g_k
        dv_f[ka:kb] += g_v
    return dq, dk, dv


def attend_bwd(
    dout, q, k, v, out, lse, q_segs, k_segs, spec: MaskSpec, *, scale: float, softcap: float | None, backend: str,
    into=None,
):  # fmt: skip
    """Gradients of attend_fwd given the FINAL out and lse of the rows (which may include other key blocks).
    Returns dq [B, Lq, H, D], dk, dv [B, Lk, Hkv, D] in the accumulation dtype, added to `into=(dq, dk, dv)` (in
    place, contiguous accumulators) when given."""
    dt = acc_dtype(q.dtype)
    if into is None:
        into = tuple(torch.zeros(t.shape, dtype=dt, device=q.device) for t in (q, k, v))
    chosen = registry.module(registry.pick(backend, q, spec))
    impl = chosen.varlen_impl(q, v, softcap)
    if impl is not None:
        return _varlen_bwd(impl, dout, q, k, v, out, lse, q_segs, k_segs, spec, scale, softcap, into)
    dq, dk, dv = into
    for qi, ki, kind, qs, ks in block_plan(q_segs, k_segs, spec):
        mask = spec.dense(qs, ks, q.device) if kind is BlockKind.MIXED else None
        args = (dout[:, qi], q[:, qi], k[:, ki], v[:, ki], out[:, qi], lse[:, :, qi])
        grads = chosen.tile_kernel(q, v, softcap, kind).bwd(*args, kind, mask, scale, softcap)
        dq[:, qi] += grads[0]
        dk[:, ki] += grads[1]
        dv[:, ki] += grads[2]
    return dq, dk, dv
