"""Collectives used by the attention algorithms. Groups are arguments; nothing here knows about CUDA, so all of
it runs on gloo. Every collective goes through `torch.distributed.<name>` (looked up at call time)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import GroupGather
from ._compat import all_gather_flat, reduce_scatter_flat


class RingExchange:
    """Send tensors to the next rank of `group` while receiving the previous rank's, in one batched P2P call.

    `start(tensors)` posts the sends and receives and returns at once (so the caller computes meanwhile);
    `wait()` returns the received tensors.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.next_rank = dist.get_global_rank(group, (rank + 1) % world)
        self.prev_rank = dist.get_global_rank(group, (rank - 1) % world)
        self._requests = None
        self._received = None

    def start(self, tensors: list[torch.Tensor]) -> None:
        if self._requests is not None:
            raise RuntimeError("hf_seqpar: RingExchange.start called twice without wait")
        tensors = [t.contiguous() for t in tensors]  # P2P needs dense buffers; a no-op in the ring's steady state
        self._received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev_rank, self.group) for r in self._received]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        if self._requests is None:
            raise RuntimeError("hf_seqpar: RingExchange.wait called before start")
        for request in self._requests:
            request.wait()
        received, self._requests, self._received = self._received, None, None
        return received


def all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, c, ...] on each rank -> [B, P*c, ...], shards concatenated in rank order."""
    world = dist.get_world_size(group)
    flat = torch.empty((world * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
    all_gather_flat(flat, x.contiguous(), group)
    return flat.unflatten(0, (world, x.shape[0])).movedim(0, 1).flatten(1, 2)


def reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Dual of all_gather_seq: [B, P*c, ...] -> [B, c, ...], summed over ranks."""
    world = dist.get_world_size(group)
    b, total = x.shape[:2]
    stacked = x.reshape(b, world, total // world, *x.shape[2:]).movedim(1, 0).contiguous()
    out = torch.empty(stacked.shape[1:], dtype=x.dtype, device=x.device)
    reduce_scatter_flat(out, stacked.flatten(0, 1), group)
    return out


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, gather: GroupGather) -> torch.Tensor:
    world = dist.get_world_size(group)
    b, c, h, d = x.shape
    send = x.reshape(b, c, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, c, H/P, D]
    recv = torch.empty_like(send)  # recv[j] = rank j's tokens of my heads
    dist.all_to_all_single(recv, send, group=group)
    return gather.to_positions(recv.permute(1, 0, 2, 3, 4).reshape(b, world * c, h // world, d), dim=1)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, gather: GroupGather) -> torch.Tensor:
    world = dist.get_world_size(group)
    b, s, hp, d = x.shape
    send = gather.to_buffer(x, dim=1).reshape(b, world, s // world, hp, d).movedim(1, 0).contiguous()
    recv = torch.empty_like(send)  # recv[j] = my tokens of rank j's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * hp, d)


class SeqToHeads(torch.autograd.Function):
    """All-to-all [B, c, H, D] (sequence shard, all heads) -> [B, P*c, H/P, D] (the group's tokens in position
    order, heads [r*H/P, (r+1)*H/P) of rank r). Backward is its dual, `HeadsToSeq`'s forward."""

    @staticmethod
    def forward(ctx, x, group, gather):
        ctx.group, ctx.gather = group, gather
        return _seq_to_heads(x, group, gather)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.gather), None, None


class HeadsToSeq(torch.autograd.Function):
    """All-to-all [B, P*c, H/P, D] -> [B, c, H, D], the inverse of `SeqToHeads`; backward is `SeqToHeads`."""

    @staticmethod
    def forward(ctx, x, group, gather):
        ctx.group, ctx.gather = group, gather
        return _heads_to_seq(x, group, gather)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.gather), None, None
