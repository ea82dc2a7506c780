"""The collectives of tensor parallelism's sequence regions (tensor_parallel.py) and of its weights (tp_weights.py):
along any dimension, over a process group, and this TP rank's piece of an SP shard."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..algorithms._compat import all_gather_flat, reduce_scatter_flat
from ..mesh import SeqParGroups


def _leading(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, 0).contiguous()


def all_gather_along(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    local = _leading(x, dim)
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    all_gather_flat(out, local, group)
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    full = _leading(x, dim)
    out = full.new_empty((full.shape[0] // size, *full.shape[1:]))
    reduce_scatter_flat(out, full, group)
    return out.movedim(0, dim)


def all_reduce_copy(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def tp_piece(x: torch.Tensor, groups: SeqParGroups, dim: int = 1) -> torch.Tensor:
    """This TP rank's contiguous piece of an SP shard along `dim` (the tokens whose loss it computes)."""
    length = x.shape[dim] // groups.tp_size
    # a copy, not a view: a view would keep the whole shard's storage alive (the embedding output, for backward)
    return x.narrow(dim, groups.tp_rank * length, length).clone(memory_format=torch.contiguous_format)


def gather_tp_pieces(piece: torch.Tensor, groups: SeqParGroups, dim: int = 1) -> torch.Tensor:
    """The TP pieces of a tensor -> the whole one along `dim`, on every TP rank (no gradient: eval outputs, the
    split weights of a checkpoint)."""
    return all_gather_along(piece.detach(), groups.tp_group, groups.tp_size, dim)
