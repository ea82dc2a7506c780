"""Ulysses (all-to-all sequence <-> heads) and USP (Ulysses inside, ring outside): composition, no new math.

Each rank trades its sequence shard of all heads for its Ulysses group's tokens of 1/u of the heads, attends
(alone for pure Ulysses, or in a ring over the other groups for USP), and trades back. Autograd chains the
collectives' duals (comm.SeqToHeads / comm.HeadsToSeq) around RingAttention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import Placement
from .comm import HeadsToSeq, SeqToHeads
from .ring import AttnArgs, RingAttention


def _repeat_heads(k: torch.Tensor, times: int) -> torch.Tensor:
    """Each head `times` times in a row ([B, c, Hkv, D] -> [B, c, Hkv * times, D]): a broadcast copy, so no repeat
    counts are read back from the device; autograd sums the copies' gradients."""
    b, c, h, d = k.shape
    return k.unsqueeze(3).expand(b, c, h, times, d).reshape(b, c, h * times, d)


def kv_heads_for_split(k: torch.Tensor, heads_q: int, ulysses: int) -> torch.Tensor:
    """K/V heads laid out so that the all-to-all hands every rank the key heads its query heads use.

    heads_kv % u == 0: as is. u % heads_kv == 0: one (replicated) key head per rank. Otherwise: expanded to one
    key head per query head. Replication happens in autograd, so the gradients of the copies are summed back.
    """
    heads_kv = k.shape[2]
    if heads_kv % ulysses == 0:
        return k
    if ulysses % heads_kv == 0:  # rank r needs key head r // (u / heads_kv)
        return _repeat_heads(k, ulysses // heads_kv)
    return _repeat_heads(k, heads_q // heads_kv)


def ulysses_attention(
    q,
    k,
    v,
    sinks,
    *,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup | None,
    placement: Placement,
    sp_rank: int,
    args: AttnArgs,
) -> torch.Tensor:
    """q [B, c, H, D], k/v [B, c, Hkv, D] placed by `placement` over the SP group -> out [B, c, H, D]."""
    u = dist.get_world_size(ulysses_group)
    heads_q = q.shape[2]
    first = sp_rank - sp_rank % u
    gather = placement.group_gather(tuple(range(first, first + u)))
    k, v = kv_heads_for_split(k, heads_q, u), kv_heads_for_split(v, heads_q, u)
    q_heads = SeqToHeads.apply(q, ulysses_group, gather)
    k_heads = SeqToHeads.apply(k, ulysses_group, gather)
    v_heads = SeqToHeads.apply(v, ulysses_group, gather)
    if sinks is not None:
        per_rank = heads_q // u
        sinks = sinks[(sp_rank % u) * per_rank : (sp_rank % u + 1) * per_rank]
    out_heads = RingAttention.apply(q_heads, k_heads, v_heads, sinks, ring_group, placement.outer(u), args)
    return HeadsToSeq.apply(out_heads, ulysses_group, gather)
