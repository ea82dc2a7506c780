"""torch.distributed version differences (the only place that knows them). Looked up at call time."""

from __future__ import annotations

import torch.distributed as dist


def all_gather_flat(output, input, group) -> None:
    """Concatenate every rank's `input` along dim 0 into `output` (torch >= 2.13 names it all_gather_single)."""
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(output, input, group=group)
    else:
        dist.all_gather_into_tensor(output, input, group=group)


def reduce_scatter_flat(output, input, group) -> None:
    """Sum `input` ([P * n, ...]) over ranks and keep this rank's n rows (reduce_scatter_single in >= 2.13)."""
    if hasattr(dist, "reduce_scatter_single"):
        dist.reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=group)
    else:
        dist.reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=group)
