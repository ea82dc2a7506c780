"""Llama-3-style attention: all-gather K/V, local queries against every key, reduce-scatter dK/dV.

Simple and exact for any mask; costs a transient full-sequence K/V per call (O(S) memory, not O(S/P)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels import attend_bwd, attend_fwd, sink_grad
from ..layout import Placement
from .comm import all_gather_seq, reduce_scatter_seq
from .ring import AttnArgs, finish_forward


def _gather_kv(k, v, group, placement: Placement):
    """Every rank's K/V shards, reordered into position order (so FULL key runs are served as one block)."""
    order = placement.group_gather(tuple(range(placement.world)))
    return order, order.to_positions(all_gather_seq(k, group), 1), order.to_positions(all_gather_seq(v, group), 1)


class AllGatherAttention(torch.autograd.Function):
    """q [B, c, H, D], k/v [B, c, Hkv, D] -> out [B, c, H, D].

    Forward: all_gather(K), all_gather(V) over `group` ([B, c, Hkv, D] -> [B, P*c, Hkv, D], rank order).
    Backward: K/V gathered again (not kept), then reduce_scatter(dK), reduce_scatter(dV) back to [B, c, Hkv, D]."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, group: dist.ProcessGroup, placement: Placement, args: AttnArgs):
        rank = dist.get_rank(group)
        order, k_all, v_all = _gather_kv(k, v, group, placement)
        out, lse = attend_fwd(
            q, k_all, v_all, placement.ranks[rank], order.segments, args.spec, **args.kernel_kwargs()
        )
        return finish_forward(ctx, q, k, v, out, lse, sinks, group, placement, args)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, placement, args = ctx.group, ctx.placement, ctx.args
        rank = dist.get_rank(group)
        order, k_all, v_all = _gather_kv(k, v, group, placement)
        dq, dk_all, dv_all = attend_bwd(
            dout, q, k_all, v_all, out, lse, placement.ranks[rank], order.segments, args.spec, **args.kernel_kwargs()
        )
        dk = reduce_scatter_seq(order.to_buffer(dk_all, 1), group)
        dv = reduce_scatter_seq(order.to_buffer(dv_all, 1), group)
        d_sinks = sink_grad(dout, out, lse, sinks) if sinks is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_sinks, None, None, None
