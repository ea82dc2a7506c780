"""The only place that knows kernel version differences: flash-attn's private varlen entry points (their signatures
have drifted between releases) and torch's vendored FA2 varlen ops (aten._flash_attention_forward / _backward).

Both compute one varlen call on [total, heads, dim] tensors with cu_seqlens offsets, GQA native (K/V are not
expanded), and a backward that takes the caller's FINAL out and lse, which a ring needs (kernels.md §0).
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import cache

import torch

VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def aten_varlen_available() -> bool:
    return hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(torch.ops.aten, "_flash_attention_backward")


def varlen_head_dims_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    """FA2 kernels: one head dim for q, k and v, a multiple of 8, at most 256 (no padding is done here)."""
    d = q.shape[-1]
    return v.shape[-1] == d and d % 8 == 0 and d <= 256


@cache
def _flash_api():
    from flash_attn import flash_attn_interface as fai

    fwd, bwd = fai._flash_attn_varlen_forward, fai._flash_attn_varlen_backward
    return fwd, bwd, set(inspect.signature(fwd).parameters), set(inspect.signature(bwd).parameters)


def flash_softcap_supported() -> bool:
    """flash-attn < 2.6 has no softcap argument: it must not be dropped silently."""
    return "softcap" in _flash_api()[2]


def _window_kwargs(params: set[str], left: int, right: int) -> dict:
    if "window_size_left" in params:  # >= 2.6 splits the window tuple
        return {"window_size_left": left, "window_size_right": right}
    return {"window_size": (left, right)}


def flash_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, causal, left, right, softcap):
    """flash-attn varlen forward -> (out [total_q, H, D], lse [H, total_q] float32, +inf on rows with no key)."""
    fwd, _, params, _ = _flash_api()
    kwargs = {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "softcap": softcap or 0.0}
    kwargs.update(alibi_slopes=None, return_softmax=False, **_window_kwargs(params, left, right))
    outputs = fwd(q, k, v, cu_q, cu_k, max_q, max_k, **{k_: v_ for k_, v_ in kwargs.items() if k_ in params})
    # >= 2.6 returns (out, lse, S_dmask, rng_state); older (out, q, k, v, out_padded, lse, S_dmask, rng_state)
    return outputs[0], outputs[1] if len(outputs) == 4 else outputs[5]


def flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, scale, causal, left, right, softcap):
    _, bwd, _, params = _flash_api()
    # zeros: rows and keys of filler sequences must come back as zero gradients whatever the kernel skips
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kwargs = {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "softcap": softcap or 0.0}
    kwargs.update(alibi_slopes=None, deterministic=False, rng_state=None, **_window_kwargs(params, left, right))
    bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        cu_q,
        cu_k,
        max_q,
        max_k,
        **{k_: v_ for k_, v_ in kwargs.items() if k_ in params},
    )
    return dq, dk, dv


def aten_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, causal, left, right):
    """torch's vendored FA2 varlen forward (CUDA; no softcap) -> (out, lse [H, total_q], +inf on empty rows)."""
    outputs = torch.ops.aten._flash_attention_forward(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        0.0,
        causal,
        False,
        scale=scale,
        window_size_left=left,
        window_size_right=right,
    )
    return outputs[0], outputs[1]


def aten_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, scale, causal, left, right):
    unused = torch.empty(0, device=q.device)  # RNG state: only read with dropout
    return torch.ops.aten._flash_attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        max_q,
        max_k,
        0.0,
        causal,
        unused,
        unused,
        scale=scale,
        window_size_left=left,
        window_size_right=right,
    )
