"""The "torch" backend: torch's own kernels. Variable-length rounds through torch's vendored FA2 (CUDA fp16/bf16,
no softcap), tiles through the fused SDPA kernels that return logsumexp (CPU flash kernel; CUDA flash /
memory-efficient kernels), and the math path (any dtype and device, float64 included, softcap) for the rest.

Tensors are [B, L, H, D]; lse is [B, H, L] in the accumulation dtype. Backward takes the FINAL out and lse of
the whole attention (not this block's), so the block's gradients come out exact with no rescaling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._compat import aten_op, aten_varlen_available, on_cuda, varlen_inputs_ok
from .mask import BlockKind
from .merge import acc_dtype

_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _grouped(q: torch.Tensor, num_kv: int) -> torch.Tensor:
    """[B, L, H, D] -> [B, Hkv, G, L, D] so that query head h uses key head h // G."""
    b, length, h, d = q.shape
    return q.reshape(b, length, num_kv, h // num_kv, d).permute(0, 2, 3, 1, 4)


def _scores(q, k, scale, softcap, mask):
    """Raw scores in the accumulation dtype, soft-capped and masked: [B, Hkv, G, Lq, Lk] (+ tanh for backward)."""
    dt = acc_dtype(q.dtype)
    s = torch.einsum("bhgqd,bhkd->bhgqk", _grouped(q.to(dt), k.shape[2]), k.to(dt).transpose(1, 2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None], float("-inf"))
    return s, t


def _safe(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def math_fwd(q, k, v, kind, mask, scale, softcap):
    b, lq, h, d = q.shape
    if kind is BlockKind.CAUSAL:
        mask = torch.ones(lq, lq, dtype=torch.bool, device=q.device).tril()[None]
    s, _ = _scores(q, k, scale, softcap, mask)
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Lq]
    p = torch.exp(s - _safe(lse)[..., None])
    out = torch.einsum("bhgqk,bhkd->bqhgd", p, v.to(p.dtype).transpose(1, 2)).reshape(b, lq, h, v.shape[-1])
    return out, lse.reshape(b, h, lq)


def math_bwd(dout, q, k, v, out, lse, kind, mask, scale, softcap):
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    if kind is BlockKind.CAUSAL:
        mask = torch.ones(lq, lq, dtype=torch.bool, device=q.device).tril()[None]
    s, t = _scores(q, k, scale, softcap, mask)
    dt = s.dtype
    lse_g = _safe(lse.to(dt)).reshape(b, hkv, h // hkv, lq)[..., None]
    p = torch.exp(s - lse_g)
    do = _grouped(dout.to(dt), hkv)
    delta = (do * _grouped(out.to(dt), hkv)).sum(-1, keepdim=True)  # rowsum(dO * O) with the final O
    vt = v.to(dt).transpose(1, 2)
    dv = torch.einsum("bhgqk,bhgqd->bkhd", p, do)
    ds = p * (torch.einsum("bhgqd,bhkd->bhgqk", do, vt) - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = torch.einsum("bhgqk,bhkd->bqhgd", ds, k.to(dt).transpose(1, 2)).reshape(b, lq, h, d) * scale
    dk = torch.einsum("bhgqk,bhgqd->bkhd", ds, _grouped(q.to(dt), hkv)) * scale
    return dq, dk, dv


def fused_supported(q: torch.Tensor, v: torch.Tensor, softcap: float | None) -> bool:
    """The SDPA kernels have no softcap; on CUDA they do not take float64; on CPU q, k and v share a head dim."""
    if softcap is not None:
        return False
    if not on_cuda(q):
        return v.shape[-1] == q.shape[-1]
    return q.dtype != torch.float64


def _bhld(x):
    return x.transpose(1, 2)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [rows, 1, Lq, Lk]. On CUDA the memory-efficient kernel wants the key stride aligned to 16
    elements, so the storage is padded and a view returned (as torch's own SDPA does)."""
    rows, lq, lk = mask.shape
    padded = -(-lk // 16) * 16 if on_cuda(mask) else lk
    bias = torch.full((rows, 1, lq, padded), float("-inf"), dtype=dtype, device=mask.device)
    bias[..., :lk].masked_fill_(mask[:, None], 0.0)
    return bias[..., :lk]


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """CUDA fused kernels want as many key heads as query heads."""
    return x if x.shape[2] == heads else x.repeat_interleave(heads // x.shape[2], dim=2)


def _fold_kv(dx: torch.Tensor, num_kv: int) -> torch.Tensor:
    b, length, h, d = dx.shape
    return dx if h == num_kv else dx.reshape(b, length, num_kv, h // num_kv, d).sum(3)


def fused_fwd(q, k, v, kind, mask, scale, softcap=None):
    causal = kind is BlockKind.CAUSAL
    if not on_cuda(q):
        fmask = None if mask is None else _float_mask(mask, q.dtype)
        out, lse = aten_op("_scaled_dot_product_flash_attention_for_cpu")(
            _bhld(q), _bhld(k), _bhld(v), 0.0, causal, attn_mask=fmask, scale=scale
        )
    else:
        h = q.shape[2]
        qh, kh, vh = _bhld(q), _bhld(_expand_kv(k, h)), _bhld(_expand_kv(v, h))
        if mask is None and q.dtype in _CUDA_FLASH_DTYPES:
            out, lse = aten_op("_scaled_dot_product_flash_attention")(qh, kh, vh, 0.0, causal, scale=scale)[:2]
        else:
            bias = None if mask is None else _float_mask(mask, q.dtype).expand(q.shape[0], h, -1, -1)
            out, lse = aten_op("_scaled_dot_product_efficient_attention")(
                qh, kh, vh, bias, True, 0.0, causal, scale=scale
            )[:2]
            lse = lse[..., : q.shape[1]]  # some versions pad lse to a multiple of 32
    lse = lse.to(acc_dtype(q.dtype))
    if mask is not None:  # fused kernels report lse = 0 for rows that saw no key; the merge needs -inf
        lse = lse.masked_fill(~mask.any(-1)[:, None, :], float("-inf"))
    return _bhld(out), lse


def _aligned_lse(lse: torch.Tensor) -> torch.Tensor:
    """[B, H, L] float32 laid out as the efficient forward returns it, rows padded to a multiple of 32: its backward
    checks that lse's batch and head strides are multiples of 8, and a tile's slice has any length."""
    b, h, length = lse.shape
    padded = -(-length // 32) * 32
    if padded == length:
        return lse.contiguous()
    buffer = torch.empty(b, h, padded, dtype=lse.dtype, device=lse.device)
    buffer[..., :length] = lse
    return buffer[..., :length]


def fused_bwd(dout, q, k, v, out, lse, kind, mask, scale, softcap=None):
    causal = kind is BlockKind.CAUSAL
    dt = q.dtype
    dout, out = dout.to(dt), out.to(dt)
    if not on_cuda(q):
        fmask = None if mask is None else _float_mask(mask, dt)
        lse_in = _safe(lse).to(torch.float64 if dt == torch.float64 else torch.float32)
        dq, dk, dv = aten_op("_scaled_dot_product_flash_attention_for_cpu_backward")(
            _bhld(dout), _bhld(q), _bhld(k), _bhld(v), _bhld(out), lse_in, 0.0, causal, attn_mask=fmask, scale=scale
        )
        return _bhld(dq), _bhld(dk), _bhld(dv)
    h, hkv = q.shape[2], k.shape[2]
    qh, kh, vh = _bhld(q), _bhld(_expand_kv(k, h)), _bhld(_expand_kv(v, h))
    lse_in = _safe(lse).float()
    if mask is None and dt in _CUDA_FLASH_DTYPES:
        lq, lk = q.shape[1], k.shape[1]
        empty = torch.empty(0, device=q.device)
        dq, dk, dv = aten_op("_scaled_dot_product_flash_attention_backward")(
            _bhld(dout),
            qh,
            kh,
            vh,
            _bhld(out),
            lse_in.contiguous(),
            empty,
            empty,
            lq,
            lk,
            0.0,
            causal,
            empty,
            empty,
            scale=scale,
        )
    else:
        bias = None if mask is None else _float_mask(mask, dt).expand(q.shape[0], h, -1, -1)
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv, _ = aten_op("_scaled_dot_product_efficient_attention_backward")(
            _bhld(dout),
            qh,
            kh,
            vh,
            bias,
            _bhld(out),
            _aligned_lse(lse_in),
            empty,
            empty,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
    return _bhld(dq), _fold_kv(_bhld(dk), hkv), _fold_kv(_bhld(dv), hkv)


class TileKernel(NamedTuple):
    """One tile's attention: fwd(q, k, v, kind, mask, scale, softcap) -> (out, lse); bwd(dout, q, k, v, out, lse,
    kind, mask, scale, softcap) -> (dq, dk, dv), given the FINAL out and lse of the rows."""

    fwd: object
    bwd: object


MATH = TileKernel(math_fwd, math_bwd)
FUSED = TileKernel(fused_fwd, fused_bwd)


def available() -> bool:
    return True


def varlen_impl(q: torch.Tensor, v: torch.Tensor, softcap: float | None) -> str | None:
    """torch's vendored FA2 for varlen rounds: CUDA fp16 / bf16, no softcap."""
    return "aten" if varlen_inputs_ok(q, v) and softcap is None and aten_varlen_available() else None


def tile_kernel(q: torch.Tensor, v: torch.Tensor, softcap: float | None, kind: BlockKind) -> TileKernel:
    return FUSED if fused_supported(q, v, softcap) else MATH
