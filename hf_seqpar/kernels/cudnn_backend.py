"""The "cudnn" backend: torch's cuDNN SDPA ops (the fastest dense kernel on Hopper in the first GPU run: 0.60 of its
time against FA2 at 128K) on unmasked tiles: FULL blocks and the aligned CAUSAL triangle, fp16 / bf16, GQA native.

cuDNN returns the log-sum-exp and its backward takes the caller's out and lse, so it serves ring hops (torch's own
context parallel calls it per hop). Masked tiles go to torch's kernels: no mask is ever given to cuDNN (pytorch#196678:
NaN dq at seq % 128 == 64 with a mask on H100/H200). Its causal mask is aligned top-left when lengths differ; the
plans only make square causal tiles. No variable-length op: `auto` sends packed rows and windows to FA2
(kernels/auto_table.py).
"""

from __future__ import annotations

import torch

from . import _compat, torch_backend
from .mask import BlockKind
from .merge import acc_dtype

__all__ = ["available", "tile_kernel", "varlen_impl"]
_HALF = (torch.float16, torch.bfloat16)


def available() -> bool:
    return _compat.cudnn_available()


def varlen_impl(q: torch.Tensor, v: torch.Tensor, softcap: float | None) -> str | None:
    return None


def _takes(q: torch.Tensor, v: torch.Tensor, softcap: float | None, kind: BlockKind) -> bool:
    d = q.shape[-1]
    return (
        kind in (BlockKind.FULL, BlockKind.CAUSAL)
        and softcap is None
        and _compat.on_cuda(q)
        and q.dtype in _HALF
        and v.shape[-1] == d
        and d % 8 == 0
        and d <= 128
    )


def cudnn_fwd(q, k, v, kind, mask, scale, softcap=None):
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views of [B, L, H, D]
    out, lse = _compat.aten_op("_scaled_dot_product_cudnn_attention")(
        qh, kh, vh, None, True, 0.0, kind is BlockKind.CAUSAL, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse.reshape(lse.shape[:3]).to(acc_dtype(q.dtype))  # lse [B, H, L, 1] -> [B, H, L]


def cudnn_bwd(dout, q, k, v, out, lse, kind, mask, scale, softcap=None):
    dt = q.dtype
    # q, out and dout in one layout ([B, H, L, D] views of contiguous [B, L, H, D]): cuDNN's backward wants the
    # output gradient strided like the output (pytorch#176915)
    qh, kh, vh = (x.contiguous().transpose(1, 2) for x in (q, k, v))
    oh, doh = (x.to(dt).contiguous().transpose(1, 2) for x in (out, dout))
    lse_in = torch_backend._safe(lse).float().contiguous()[..., None]  # rows that saw no key: any finite value
    empty = torch.empty(0, device=q.device)
    dq, dk, dv = _compat.aten_op("_scaled_dot_product_cudnn_attention_backward")(
        doh, qh, kh, vh, oh, lse_in, empty, empty, None, empty, empty, q.shape[1], k.shape[1], 0.0,
        kind is BlockKind.CAUSAL, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


CUDNN = torch_backend.TileKernel(cudnn_fwd, cudnn_bwd)


def tile_kernel(q, v, softcap, kind) -> torch_backend.TileKernel:
    return CUDNN if _takes(q, v, softcap, kind) else torch_backend.tile_kernel(q, v, softcap, kind)
