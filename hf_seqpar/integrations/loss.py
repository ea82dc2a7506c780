"""Token-weighted loss across the SP group (eval, logging): every valid target counted once, shards without
targets contribute nothing (never NaN)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def token_weighted_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor, *, group=None) -> torch.Tensor:
    """sum over the group of `loss_sum` / sum of `num_tokens`; 0 when the group has no valid target at all.

    `loss_sum` is this rank's summed token loss (e.g. `model(**batch, num_items_in_batch=1).loss`), `num_tokens`
    its count of targets != -100 (`(batch["shift_labels"] != -100).sum()`). Not differentiable: for reporting.
    """
    totals = torch.stack([loss_sum.detach().double(), num_tokens.detach().double().to(loss_sum.device)])
    if group is not None or (dist.is_available() and dist.is_initialized()):
        dist.all_reduce(totals, group=group)
    return (totals[0] / totals[1].clamp(min=1)).to(loss_sum.dtype)
