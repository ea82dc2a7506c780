"""The only place that knows flash-attn version differences (its block API is private and has changed)."""

from __future__ import annotations

import importlib.util
import inspect
from functools import cache


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@cache
def _flash_api():
    from flash_attn import flash_attn_interface as fai

    fwd, bwd = fai._flash_attn_forward, fai._flash_attn_backward
    split_window = "window_size_left" in inspect.signature(fwd).parameters  # >= 2.6.0 splits the window tuple
    return fwd, bwd, split_window


def _no_window(split_window: bool) -> dict:
    """flash-attn's "no sliding window" argument; windows are cut into blocks before the kernel is called."""
    return {"window_size_left": -1, "window_size_right": -1} if split_window else {"window_size": (-1, -1)}


def flash_forward(q, k, v, scale: float, causal: bool, softcap: float | None):
    """flash-attn block forward on [B, L, H, D] tensors -> (out, lse [B, H, L] float32)."""
    fwd, _, split_window = _flash_api()
    window = _no_window(split_window)
    outputs = fwd(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        softcap=softcap or 0.0,
        alibi_slopes=None,
        return_softmax=False,
        **window,
    )
    return outputs[0], outputs[1] if split_window else outputs[5]


def flash_backward(dout, q, k, v, out, lse, scale: float, causal: bool, softcap: float | None):
    import torch

    _, bwd, split_window = _flash_api()
    window = _no_window(split_window)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bwd(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        softcap=softcap or 0.0,
        alibi_slopes=None,
        deterministic=False,
        rng_state=None,
        **window,
    )
    return dq, dk, dv
