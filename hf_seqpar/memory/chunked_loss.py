"""Next-token log-probabilities over sequence chunks, without holding the [tokens, vocab] logits.

A causal LM's loss needs, per token, log p(target) = z_target - logsumexp(z) with z = lm_head(hidden) in float32. The
plain path keeps z, its log-softmax and their gradients: several [tokens, vocab] float32 tensors, which at long context
and a large vocabulary dominate a training step's memory (for a 32K vocabulary, 128 KB per token and copy). Here the
tokens are cut into chunks: the forward computes each chunk's logits, keeps only its [chunk] log-probabilities and
drops the logits; the backward recomputes each chunk's logits and turns them into that chunk's gradient. Peak memory
is a few [chunk, vocab] tensors instead of [tokens, vocab]; the price is one more lm_head forward.

`logits_fn` is whatever maps hidden states to the float32 logits (the model's lm_head module, LoRA included, and the
model's own logit post-processing), called under the autocast state of the forward in both passes, so that each
chunk's logits are those of the plain path exactly. The math per token is the plain path's; only sums over tokens
(the loss, the lm_head weight gradient) are added up in another order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

IGNORE_INDEX = -100


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _target_log_probs_and_lse(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """(log p(target), logsumexp) per row of float32 `logits` [c, V], log p = 0 where the target is ignored.

    Consumes `logits` (exponentiated in place): one [c, V] buffer instead of the two of `torch.logsumexp`."""
    valid = targets != ignore_index
    picked = logits.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    row_max = logits.amax(dim=-1)
    lse = row_max + logits.sub_(row_max[:, None]).exp_().sum(dim=-1).log()
    return torch.where(valid, picked - lse, 0.0), lse


def _add_into(sums: list[torch.Tensor], grads) -> None:
    for total, grad in zip(sums, grads, strict=True):
        if grad is not None:  # a parameter logits_fn did not use this time
            total += grad


class ChunkedTargetLogProbs(torch.autograd.Function):
    """log p(target) per token, [T] float32, from `hidden` [T, H], chunk by chunk over the T tokens.

    forward(hidden [T, H], targets [T] int64, logits_fn, chunk_tokens, ignore_index, *params) -> [T] float32, 0 where
    the target is ignored. `params` are the tensors `logits_fn` uses that need gradients (the lm_head weight, LoRA
    factors); they are inputs only so that autograd hands them their gradients. Saved: hidden, targets and the [T]
    logsumexp.
    backward: for each chunk, recompute z = logits_fn(hidden_chunk) under the forward's autocast state, turn it in
    place into dL/dz = g * (onehot(target) - exp(z - lse)) (g: the incoming gradient, 0 on ignored tokens) and send it
    through `logits_fn`'s own graph with `torch.autograd.grad`; hidden gets its rows, params the sum over chunks.
    Peak: one [chunk, V] float32 buffer (plus its lower-precision source under autocast) and one set of param grads.
    """

    @staticmethod
    def forward(ctx, hidden, targets, logits_fn, chunk_tokens, ignore_index, *params):
        ctx.logits_fn, ctx.chunk_tokens, ctx.ignore_index = logits_fn, chunk_tokens, ignore_index
        ctx.autocast = _autocast_state(hidden.device.type)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            logits = logits_fn(hidden[start:stop])
            out[start:stop], lse[start:stop] = _target_log_probs_and_lse(logits, targets[start:stop], ignore_index)
            del logits
        ctx.save_for_backward(hidden, targets, lse, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, targets, lse, *params = ctx.saved_tensors
        needs_hidden = ctx.needs_input_grad[0]
        needs_params = list(ctx.needs_input_grad[5:])
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_params = [  # summed over chunks in float32 at least: bf16 sums of hundreds of chunks would drift
            torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) if need else None
            for p, need in zip(params, needs_params, strict=True)
        ]
        wanted = [p for p, need in zip(params, needs_params, strict=True) if need]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                stop = start + ctx.chunk_tokens
                chunk = hidden[start:stop].detach().requires_grad_(needs_hidden)
                chunk_targets = targets[start:stop]
                logits = ctx.logits_fn(chunk)
                with torch.no_grad():  # the logits become their own gradient: no op of logits_fn saved its output
                    valid = chunk_targets != ctx.ignore_index
                    weight = torch.where(valid, grad_out[start:stop].float(), 0.0)
                    grad_logits = logits.detach().sub_(lse[start:stop, None]).exp_().mul_(-weight[:, None])
                    grad_logits.scatter_add_(1, torch.where(valid, chunk_targets, 0)[:, None], weight[:, None])
                inputs = ([chunk] if needs_hidden else []) + wanted
                grads = torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True) if inputs else ()
                del logits, grad_logits
                if needs_hidden:
                    grad_hidden[start:stop] = grads[0]
                _add_into([g for g in grad_params if g is not None], grads[int(needs_hidden) :])
                del grads  # before the next chunk: a chunk's parameter gradient is as large as the parameter
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grad_params, params, strict=True)]
        return (grad_hidden, None, None, None, None, *grad_params)


def chunked_target_log_probs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """log p(target) for `hidden` [..., H] and `targets` [...], shaped like `targets`; see ChunkedTargetLogProbs."""
    if chunk_tokens < 1:
        raise ValueError(f"hf_seqpar: chunk_tokens={chunk_tokens} must be a positive number of tokens")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(hidden.device)
    if flat_hidden.shape[0] != flat_targets.shape[0]:
        raise ValueError(
            f"hf_seqpar: {flat_hidden.shape[0]} hidden states but {flat_targets.shape[0]} targets; the labels must "
            "have the input's [batch, sequence] shape"
        )
    trainable = [p for p in params if p.requires_grad]
    log_probs = ChunkedTargetLogProbs.apply(
        flat_hidden, flat_targets, logits_fn, chunk_tokens, ignore_index, *trainable
    )
    return log_probs.view(targets.shape)


def causal_lm_loss(
    log_probs: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The plain causal-LM loss from per-token log-probabilities: sum / num_items_in_batch when given (a tensor or an
    int), else the mean over valid targets (NaN when there is none, as the plain cross-entropy mean)."""
    total = -log_probs.sum()
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
