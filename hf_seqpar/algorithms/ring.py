"""Ring attention: each rank keeps its query shard while the K/V shards travel once around the group.

Forward: P steps; at each step the next hop's send/recv is posted before the current block is computed, so the
transfer overlaps the compute; partial results merge in the accumulation dtype (kernels/merge.py).
Backward: K/V travel around again and the dK/dV partial sums travel with them (P-1 hops each), each block
recomputed from the saved final (out, lse). A rank never holds more than two K/V shards and no S x S tensor.
With a group of one rank (or None) this is plain local attention over the rank's runs: Ulysses uses it so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels import MaskSpec, acc_dtype, add_sinks, attend_bwd, attend_fwd, sink_grad
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


def run_steps(steps):
    """Drive a step generator to its end and return its value (the real ring: nothing happens at the yields)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def ring_forward_steps(q, k, v, rank: int, world: int, exchange, placement: Placement, args: AttnArgs):
    """This rank's ring forward as a generator: it yields after each step's compute, before waiting for the next
    K/V, so that a simulator can drive P ranks in lockstep on one device; returns (out, lse).

    `exchange`: start(tensors) posts the send to the next rank / receive from the previous one, wait() returns
    what arrived (comm.RingExchange). Each hop is posted before the step's compute, which it overlaps."""
    acc = None
    k_cur, v_cur = k, v
    for step in range(world):
        if step < world - 1:
            exchange.start([k_cur, v_cur])
        source = (rank - step) % world
        acc = attend_fwd(
            q,
            k_cur,
            v_cur,
            placement.ranks[rank],
            placement.ranks[source],
            args.spec,
            **args.kernel_kwargs(),
            into=acc,
        )
        yield
        if step < world - 1:
            k_cur, v_cur = exchange.wait()
    return acc


def ring_backward_steps(
    dout, q, k, v, out, lse, rank: int, world: int, kv_exchange, dkv_exchange, placement: Placement, args: AttnArgs
):
    """This rank's ring backward as a generator (yields as `ring_forward_steps`); returns (dq, dk, dv).

    K/V travel around again (P-1 hops). The dK/dV partial sums of shard x start at rank x+1 and travel P-1 hops,
    collecting every other rank's contribution, to arrive home at x, which adds its own (kept since step 0): the
    minimum, P-1 hops of accumulators, each posted as soon as it is complete so that it overlaps the next compute."""
    dt = acc_dtype(q.dtype)
    dq, own = torch.zeros(q.shape, dtype=dt, device=q.device), None
    k_cur, v_cur = k, v
    for step in range(world):
        if step < world - 1:
            kv_exchange.start([k_cur, v_cur])
        source = (rank - step) % world
        fresh = (torch.zeros(k.shape, dtype=dt, device=q.device), torch.zeros(v.shape, dtype=dt, device=q.device))
        dq, dk_blk, dv_blk = attend_bwd(
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
            into=(dq, *fresh),
        )
        if step == 0:
            own = (dk_blk, dv_blk)
        else:
            if step > 1:  # the partial sums of `source`'s shard so far, from the previous rank
                dk_acc, dv_acc = dkv_exchange.wait()
                dk_blk.add_(dk_acc)
                dv_blk.add_(dv_acc)
            dkv_exchange.start([dk_blk, dv_blk])
        yield
        if step < world - 1:
            k_cur, v_cur = kv_exchange.wait()
    if world > 1:  # every other rank's contribution to this rank's shard
        dk_acc, dv_acc = dkv_exchange.wait()
        own[0].add_(dk_acc)
        own[1].add_(dv_acc)
    return dq, own[0], own[1]


class RingAttention(torch.autograd.Function):
    """q [B, c, H, D], k/v [B, c, Hkv, D] (this rank's runs of `placement`) -> out [B, c, H, D].

    Backward returns dq, dk, dv for this rank's shards (each dK/dV shard collected from every rank's queries)
    and this rank's share of d(sinks)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, group, placement: Placement, args: AttnArgs):
        rank, world = _rank_and_world(group)
        ring = RingExchange(group) if world > 1 else None
        out, lse = run_steps(ring_forward_steps(q, k, v, rank, world, ring, placement, args))
        return finish_forward(ctx, q, k, v, out, lse, sinks, group, placement, args)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, placement, args = ctx.group, ctx.placement, ctx.args
        rank, world = _rank_and_world(group)
        kv_ring = RingExchange(group) if world > 1 else None
        dkv_ring = RingExchange(group) if world > 1 else None
        dq, dk, dv = run_steps(
            ring_backward_steps(dout, q, k, v, out, lse, rank, world, kv_ring, dkv_ring, placement, args)
        )
        d_sinks = sink_grad(dout, out, lse, sinks) if sinks is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_sinks, None, None, None
