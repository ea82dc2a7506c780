"""The one shim every private kernel op goes through: flash-attn's private varlen entry points (their signatures
have drifted between releases), torch's vendored FA2 varlen ops (aten._flash_attention_forward / _backward) and the
SDPA ops that return logsumexp (`aten_op`). Under the CPU stand-in (standin.py) the CUDA ones resolve to it, and
`on_cuda` sends CPU tensors down the CUDA dispatch.

The varlen ops compute one call on [total, heads, dim] tensors with cu_seqlens offsets, GQA native (K/V are not
expanded), and a backward that takes the caller's FINAL out and lse, which a ring needs (kernels.md §0).
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import cache

import torch

from . import standin

VARLEN_DTYPES = (torch.float16, torch.bfloat16)
CUDA_OPS = (  # the private CUDA ops the kernels call; each has a stand-in of the same name
    "_flash_attention_forward",
    "_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
)


def on_cuda(t: torch.Tensor) -> bool:
    """Whether `t` takes the CUDA dispatch: a CUDA tensor, or any tensor under the CPU stand-in."""
    return t.is_cuda or standin.active()


def aten_op(name: str):
    """A private aten op by name; a CUDA one resolves to its stand-in under the CPU stand-in."""
    if name in CUDA_OPS and standin.active():
        return getattr(standin, name)
    return getattr(torch.ops.aten, name)


def varlen_dtypes() -> tuple[torch.dtype, ...]:
    """fp16 / bf16; the stand-in's exactness mode adds float64."""
    return VARLEN_DTYPES + ((torch.float64,) if standin.float64_varlen() else ())


def varlen_inputs_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    """What every FA2 varlen kernel takes: CUDA, fp16 / bf16, one head dim (multiple of 8, at most 256)."""
    return on_cuda(q) and q.dtype in varlen_dtypes() and varlen_head_dims_ok(q, v)


def cudnn_available() -> bool:
    """torch's cuDNN SDPA ops on an Ampere-or-newer GPU (the stand-in plays one)."""
    if standin.active():
        return standin.cudnn_installed()
    return _real_cudnn_available()


@cache
def _real_cudnn_available() -> bool:  # asked on every attention call (auto): once per process is enough
    return (
        hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        and torch.cuda.is_available()
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability() >= (8, 0)
    )


def flash_attn_available() -> bool:
    if standin.active():
        return standin.flash_attn_installed()
    return importlib.util.find_spec("flash_attn") is not None


def aten_varlen_available() -> bool:
    return standin.active() or all(hasattr(torch.ops.aten, op) for op in CUDA_OPS[:2])


def varlen_head_dims_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    """FA2 kernels: one head dim for q, k and v, a multiple of 8, at most 256 (no padding is done here)."""
    d = q.shape[-1]
    return v.shape[-1] == d and d % 8 == 0 and d <= 256


def _flash_api():
    if standin.active():
        return (standin.flash_attn_varlen_forward, standin.flash_attn_varlen_backward, *standin.FLASH_ATTN_PARAMS)
    return _installed_flash_api()


@cache
def _installed_flash_api():
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
    outputs = aten_op("_flash_attention_forward")(
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
    return aten_op("_flash_attention_backward")(
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
