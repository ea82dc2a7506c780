"""Ring attention: each rank keeps its query shard while the K/V shards travel once around the group.

Forward: P steps; at each step the next hop's send/recv is posted before the current block is computed, so the
transfer overlaps the compute; partial results merge in the accumulation dtype (kernels/merge.py).
Backward: K/V travel around again and the dK/dV accumulators travel with them (P hops), each block recomputed
from the saved final (out, lse). A rank never holds more than two K/V shards and no S x S tensor.
With a group of one rank (or None) this is plain local attention over the rank's runs: Ulysses uses it so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels import MaskSpec, add_sinks, attend_bwd, attend_fwd, merge_into, sink_grad
from ..layout import Placement
from .comm import RingExchange


@dataclass(frozen=True)
class AttnArgs:
    """The non-tensor arguments of one attention call."""

    spec: MaskSpec
    scale: float
    softcap: float | None
    backend: str

    def kernel_kwargs(self) -> dict:
        return {"scale": self.scale, "softcap": self.softcap, "backend": self.backend}


def finish_forward(ctx, q, k, v, out, lse, sinks, group, placement: Placement, args: AttnArgs) -> torch.Tensor:
    """Shared tail of the attention Functions: merge the sinks, cast, keep what backward recomputes from."""
    if sinks is not None:
        add_sinks(out, lse, sinks)
    result = out.to(q.dtype)
    ctx.save_for_backward(q, k, v, result, lse, sinks)
    ctx.group, ctx.placement, ctx.args = group, placement, args
    return result


def _rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


class RingAttention(torch.autograd.Function):
    """q [B, c, H, D], k/v [B, c, Hkv, D] (this rank's runs of `placement`) -> out [B, c, H, D].

    Backward returns dq, dk, dv for this rank's shards (each dK/dV shard collected from every rank's queries)
    and this rank's share of d(sinks)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, group, placement: Placement, args: AttnArgs):
        rank, world = _rank_and_world(group)
        ring = RingExchange(group) if world > 1 else None
        out = lse = None
        k_cur, v_cur = k, v
        for step in range(world):
            if step < world - 1:
                ring.start([k_cur, v_cur])
            source = (rank - step) % world
            blk_out, blk_lse = attend_fwd(
                q, k_cur, v_cur, placement.ranks[rank], placement.ranks[source], args.spec, **args.kernel_kwargs()
            )
            if out is None:
                out, lse = blk_out, blk_lse
            else:
                merge_into(out, lse, blk_out, blk_lse)
            if step < world - 1:
                k_cur, v_cur = ring.wait()
        return finish_forward(ctx, q, k, v, out, lse, sinks, group, placement, args)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, placement, args = ctx.group, ctx.placement, ctx.args
        rank, world = _rank_and_world(group)
        kv_ring = RingExchange(group) if world > 1 else None
        dkv_ring = RingExchange(group) if world > 1 else None
        dq = dk_acc = dv_acc = None
        k_cur, v_cur = k, v
        for step in range(world):
            if step < world - 1:
                kv_ring.start([k_cur, v_cur])
            source = (rank - step) % world
            dq_blk, dk_blk, dv_blk = attend_bwd(
                dout,
                q,
                k_cur,
                v_cur,
                out,
                lse,
                placement.ranks[rank],
                placement.ranks[source],
                args.spec,
                **args.kernel_kwargs(),
            )
            dq = dq_blk if dq is None else dq.add_(dq_blk)
            if step > 0:  # the accumulators of `source`'s shard arrive from the previous rank
                dk_acc, dv_acc = dkv_ring.wait()
                dk_blk.add_(dk_acc)
                dv_blk.add_(dv_acc)
            dk_acc, dv_acc = dk_blk, dv_blk
            if world > 1:
                dkv_ring.start([dk_acc, dv_acc])
            if step < world - 1:
                k_cur, v_cur = kv_ring.wait()
        if world > 1:  # one last hop brings this rank's own accumulators home
            dk_acc, dv_acc = dkv_ring.wait()
        d_sinks = sink_grad(dout, out, lse, sinks) if sinks is not None else None
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), d_sinks, None, None, None
