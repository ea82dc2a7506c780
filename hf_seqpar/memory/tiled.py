"""A per-token function (a transformer MLP) over sequence chunks, each chunk recomputed in backward.

An MLP keeps, per token, a few tensors of its intermediate width (gate, up, activation, product: for Llama-3-8B
14,336 values each, about 3.5 times the hidden width), and at long context those dominate a layer's activations.
Applied chunk by chunk under non-reentrant checkpointing, the forward keeps only each chunk's input (a view of the
layer's input, no copy) and the backward recomputes one chunk at a time: the intermediates of one chunk at most.

Exact: the function sees each token's row unchanged, and parameter gradients flow through autograd's usual
accumulation (once per backward, so DDP's hooks see one gradient per parameter). Nested inside gradient checkpointing
of the whole layer it works too: the layer's recompute then keeps only the chunks' inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, chunk_tokens: int, dim: int = -2
) -> torch.Tensor:
    """`fn(x)` computed over chunks of `chunk_tokens` along `dim`, each recomputed in backward when grads are on.

    `fn` must treat positions along `dim` independently (an MLP does) and return a tensor of `x`'s length along it."""
    if chunk_tokens < 1:
        raise ValueError(f"hf_seqpar: chunk_tokens={chunk_tokens} must be a positive number of tokens")
    chunks = x.split(chunk_tokens, dim=dim)
    if not torch.is_grad_enabled():  # inference, or the no-grad first pass of reentrant checkpointing
        outs = [fn(chunk) for chunk in chunks]
    else:
        outs = [checkpoint(fn, chunk, use_reentrant=False) for chunk in chunks]
    for out in outs:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"hf_seqpar: tiled_apply needs a function returning one tensor; got {type(out).__name__}")
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=dim)
