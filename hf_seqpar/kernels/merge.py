"""The one place where partial attention results are combined (numerics live here only).

Partial results are (out, lse) over disjoint key sets: out [B, L, H, D], lse [B, H, L] in the accumulation dtype
(float32, or float64 for float64 inputs). Rows that saw no key carry lse = -inf and out = 0.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or in float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- softmax-weighted union of (out, lse) and (block_out, block_lse).

    lse' = logaddexp(lse, lse_b); out' = out * exp(lse - lse') + out_b * exp(lse_b - lse'). Rows where both are
    empty stay (0, -inf) instead of turning into NaN.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    safe = _finite(new_lse)
    w_old = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)
    w_blk = torch.exp(block_lse - safe).transpose(1, 2).unsqueeze(-1)
    # Two passes over `out` (the weights are per row, small): a memory-bound merge at every ring hop adds up
    out.mul_(w_old).addcmul_(block_out, w_blk.to(out.dtype))
    lse.copy_(new_lse)


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> None:
    """In place: merge a per-head sink logit (a key with value 0) into every row, as GPT-OSS attention does."""
    merge_into(out, lse, torch.zeros((), dtype=out.dtype, device=out.device), sinks.to(lse.dtype)[None, :, None])


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks for this rank's rows: -sum_i exp(sink - lse_i) * <dout_i, out_i>, per head.

    `out` and `lse` are final (sinks included). The q/k/v gradients need no correction: the usual backward with
    the final (out, lse) is already exact with sinks.
    """
    delta = (dout.to(out.dtype) * out).sum(-1).transpose(1, 2)  # [B, H, L]
    p_sink = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
