"""A row-wise function (an RMSNorm) over chunks of its input, in forward and backward, keeping only the input.

An RMSNorm of a bf16 model computes in float32: the float32 copy of its input, its square, the normalized values,
and in backward as many float32 gradients of the same [tokens, hidden] shape (for Llama-3-8B 16 KB per token each).
Checkpointing the norm stops them being kept between forward and backward, but its backward still holds them all at
once, for the whole sequence, and at long context that backward is a LoRA step's peak. Here the norm runs over
chunks of the sequence: the forward writes each chunk's output into one output tensor, and the backward recomputes
one chunk at a time through the function's own graph and writes that chunk's input gradient into one gradient
tensor of the input's dtype. Extra memory: the float32 temporaries of one chunk, not of the sequence.

Exact: the function is the model's own (its forward, under the forward's autocast state), and each chunk holds whole
rows, so every output and input-gradient value is computed by the same ops on the same numbers as without chunks
(the reductions run over the last dimension only). Parameter gradients are sums over tokens: they are added up chunk
by chunk in float32, so they equal the plain path's to float rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import chunked_loss
from .chunked_loss import _add_into


class ChunkedRowwise(torch.autograd.Function):
    """`fn(x)` over chunks of `chunk` positions along `dim`, for an `fn` that treats every position independently.

    forward(x [..., H], fn, dim, chunk, *params) -> y, shaped like `x` but for fn's last dimension, in fn's output
    dtype. `params` are the tensors `fn` uses that need gradients (the norm's weight); they are inputs only so that
    autograd hands them their gradients. Saved: x (and the params).
    backward: for each chunk, recompute y_c = fn(x_c) under the forward's autocast state and send dy_c through its
    graph with `torch.autograd.grad`; dx gets its slice (a tensor of x's dtype, allocated once), params the sum over
    chunks in float32, cast to their dtype at the end. Peak: one chunk's forward and backward temporaries.
    """

    @staticmethod
    def forward(ctx, x, fn, dim, chunk, *params):
        ctx.fn, ctx.dim, ctx.chunk = fn, dim, chunk
        ctx.autocast = chunked_loss._autocast_state(x.device.type)  # one definition (memory_breakdown's meta runs)
        out = None
        for start in range(0, x.shape[dim], chunk):
            part = fn(x.narrow(dim, start, min(chunk, x.shape[dim] - start)))
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"hf_seqpar: chunked_rowwise needs a function returning one tensor; got {type(part)}")
            if out is None:
                out = part.new_empty(x.shape[:-1] + part.shape[-1:])
            out.narrow(dim, start, part.shape[dim]).copy_(part)
            del part
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        needs_params = list(ctx.needs_input_grad[4:])
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_x else None
        grad_params = [  # float32 at least: a bf16 sum of many chunks would drift
            torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) if need else None
            for p, need in zip(params, needs_params, strict=True)
        ]
        wanted = [p for p, need in zip(params, needs_params, strict=True) if need]
        enabled, dtype = ctx.autocast
        dim, size = ctx.dim, x.shape[ctx.dim]
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            for start in range(0, size, ctx.chunk):
                length = min(ctx.chunk, size - start)
                part = x.narrow(dim, start, length).detach().requires_grad_(needs_x)
                out = ctx.fn(part)
                inputs = ([part] if needs_x else []) + wanted
                grads = torch.autograd.grad(out, inputs, grad_out.narrow(dim, start, length), allow_unused=True)
                del out
                if needs_x:
                    grad_x.narrow(dim, start, length).copy_(grads[0])
                _add_into([g for g in grad_params if g is not None], grads[int(needs_x) :])
                del grads
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grad_params, params, strict=True)]
        return (grad_x, None, None, None, *grad_params)


def chunked_rowwise(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    chunk_elements: int,
    dim: int | None = None,
) -> torch.Tensor:
    """`fn(x)` for an `fn` acting on each vector along x's last dimension alone (an RMSNorm), computed over chunks
    along `dim` (default: the longest of the other dimensions, the sequence) of about `chunk_elements` values each;
    see ChunkedRowwise. `params`: what `fn` uses (those that need no gradient are dropped here)."""
    if chunk_elements < 1:
        raise ValueError(f"hf_seqpar: chunk_elements={chunk_elements} must be a positive number of values")
    if x.dim() < 2:
        raise ValueError(f"hf_seqpar: chunked_rowwise needs rows to chunk; got a tensor of shape {tuple(x.shape)}")
    if x.numel() == 0:
        return fn(x)
    if dim is None:
        dim = max(range(x.dim() - 1), key=lambda d: x.shape[d])
    dim %= x.dim()
    if dim == x.dim() - 1:
        raise ValueError("hf_seqpar: chunked_rowwise cannot chunk the last dimension, which fn reduces over")
    per_position = x.numel() // max(1, x.shape[dim])
    chunk = max(1, chunk_elements // max(1, per_position))
    trainable = [p for p in params if p.requires_grad]
    return ChunkedRowwise.apply(x, fn, dim, chunk, *trainable)
