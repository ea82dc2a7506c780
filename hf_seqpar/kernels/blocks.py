"""Attention of query runs against key runs, block by block, with the mask decided per block on the host."""

from __future__ import annotations

import bisect

import torch

from ..layout import Segment
from . import _compat, torch_backend
from .mask import BlockKind, MaskSpec
from .merge import acc_dtype, merge_into

BACKENDS = ("torch", "flash_attn", "math")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' -> flash_attn when installed and the inputs suit it, else torch."""
    if backend == "auto":
        suits = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _compat.flash_attn_available()
        return "flash_attn" if suits else "torch"
    if backend == "flash_attn" and not _compat.flash_attn_available():
        raise ValueError("backend='flash_attn' needs the flash-attn package (pip install 'hf_seqpar[flash]')")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {('auto',) + BACKENDS}")
    return backend


def _split(segs: tuple[Segment, ...], cuts: list[int], window: int | None) -> list[tuple[int, Segment]]:
    """Cut runs at `cuts` (and at multiples of the window) -> (offset in the tensor, run) tiles."""
    tiles, offset = [], 0
    for seg in segs:
        points = {seg.start, seg.end}
        points.update(cuts[bisect.bisect_right(cuts, seg.start) : bisect.bisect_left(cuts, seg.end)])
        if window is not None:
            points.update(range(-(-seg.start // window) * window, seg.end, window))
        points = sorted(points)
        tiles += [(offset + a - seg.start, Segment(a, b - a)) for a, b in zip(points, points[1:], strict=False)]
        offset += seg.length
    return tiles


def _pairs(q_segs, k_segs, spec: MaskSpec):
    """(query slice, key slice, kind, q run, k run) for every block that is not fully masked.

    Both sides are cut at each other's run boundaries, at document starts and at multiples of the window, so
    that almost every block is EMPTY, FULL or CAUSAL; neighbouring FULL key tiles are served as one block.
    Only key tiles inside the reach of a query tile (its documents, its window, the causal limit) are looked at.
    """
    cuts = {p for seg in q_segs + k_segs for p in (seg.start, seg.end)}
    if spec.docs is not None:
        cuts.update(p for row in spec.docs for p in row)
    cuts = sorted(cuts)
    k_tiles = sorted(_split(k_segs, cuts, spec.window), key=lambda t: t[1].start)
    k_starts = [t[1].start for t in k_tiles]
    for q_off, qs in _split(q_segs, cuts, spec.window):
        lo, hi = spec.reach(qs)
        run = None  # (k slice start, k slice stop, merged k run) of consecutive FULL tiles
        for k_off, ks in k_tiles[max(bisect.bisect_right(k_starts, lo) - 1, 0) : bisect.bisect_left(k_starts, hi)]:
            kind = spec.classify(qs, ks)
            if kind is BlockKind.FULL and run and run[1] == k_off and run[2].end == ks.start:
                run = (run[0], k_off + ks.length, Segment(run[2].start, run[2].length + ks.length))
                continue
            if run:
                yield slice(q_off, q_off + qs.length), slice(run[0], run[1]), BlockKind.FULL, qs, run[2]
                run = None
            if kind is BlockKind.FULL:
                run = (k_off, k_off + ks.length, ks)
            elif kind is not BlockKind.EMPTY:
                yield slice(q_off, q_off + qs.length), slice(k_off, k_off + ks.length), kind, qs, ks
        if run:
            yield slice(q_off, q_off + qs.length), slice(run[0], run[1]), BlockKind.FULL, qs, run[2]


def _flash_ok(backend: str, kind: BlockKind, q: torch.Tensor) -> bool:
    return backend == "flash_attn" and kind is not BlockKind.MIXED and q.dtype in (torch.float16, torch.bfloat16)


def attend_fwd(
    q,
    k,
    v,
    q_segs: tuple[Segment, ...],
    k_segs: tuple[Segment, ...],
    spec: MaskSpec,
    *,
    scale: float,
    softcap: float | None,
    backend: str,
):
    """q [B, Lq, H, D] against k, v [B, Lk, Hkv, D] -> (out, lse): out [B, Lq, H, D] and lse [B, H, Lq] in the
    accumulation dtype. Rows that see no key get (0, -inf)."""
    b, lq, h, d = q.shape
    dt = acc_dtype(q.dtype)
    out = torch.zeros(b, lq, h, d, dtype=dt, device=q.device)
    lse = torch.full((b, h, lq), float("-inf"), dtype=dt, device=q.device)
    for qi, ki, kind, qs, ks in _pairs(q_segs, k_segs, spec):
        mask = spec.dense(qs, ks, q.device) if kind is BlockKind.MIXED else None
        qb, kb, vb = q[:, qi], k[:, ki], v[:, ki]
        if _flash_ok(backend, kind, q):
            blk_out, blk_lse = _compat.flash_forward(qb, kb, vb, scale, kind is BlockKind.CAUSAL, softcap)
        elif backend != "math" and torch_backend.fused_supported(q, softcap):
            blk_out, blk_lse = torch_backend.fused_fwd(qb, kb, vb, kind, mask, scale)
        else:
            blk_out, blk_lse = torch_backend.math_fwd(qb, kb, vb, kind, mask, scale, softcap)
        merge_into(out[:, qi], lse[:, :, qi], blk_out, blk_lse.to(dt))
    return out, lse


def attend_bwd(
    dout, q, k, v, out, lse, q_segs, k_segs, spec: MaskSpec, *, scale: float, softcap: float | None, backend: str
):
    """Gradients of attend_fwd given the FINAL out and lse of the rows (which may include other key blocks).
    Returns dq [B, Lq, H, D], dk, dv [B, Lk, Hkv, D] in the accumulation dtype."""
    dt = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    for qi, ki, kind, qs, ks in _pairs(q_segs, k_segs, spec):
        mask = spec.dense(qs, ks, q.device) if kind is BlockKind.MIXED else None
        args = (dout[:, qi], q[:, qi], k[:, ki], v[:, ki], out[:, qi], lse[:, :, qi])
        if _flash_ok(backend, kind, q):
            o = args[4].to(q.dtype)
            grads = _compat.flash_backward(
                *args[:4], o, args[5].float().contiguous(), scale, kind is BlockKind.CAUSAL, softcap
            )
        elif backend != "math" and torch_backend.fused_supported(q, softcap):
            grads = torch_backend.fused_bwd(*args, kind, mask, scale)
        else:
            grads = torch_backend.math_bwd(*args, kind, mask, scale, softcap)
        dq[:, qi] += grads[0]
        dk[:, ki] += grads[1]
        dv[:, ki] += grads[2]
    return dq, dk, dv
