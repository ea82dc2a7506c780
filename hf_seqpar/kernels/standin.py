"""CPU stand-ins of the CUDA attention ops the package calls, so that the CUDA path's plans and calls run everywhere.

Under `cuda_standin()` (or `HF_SEQPAR_CUDA_STANDIN=1`) the kernel dispatch treats CPU tensors as CUDA tensors and
`_compat` routes every private CUDA op to the function of the same name here. Each one takes the real op's arguments
and returns what it returns, computed in plain torch (float32 or float64), and copies the parts of its contract a
caller can get wrong:

- `aten._flash_attention_forward` / `_backward` (torch: aten/src/ATen/native/transformers/cuda/flash_attn/
  flash_api.cpp, `mha_varlen_fwd` / `mha_varlen_bwd` and `set_params_fprop`) and flash-attn's
  `_flash_attn_varlen_forward` / `_backward` (flash_attn/flash_attn_interface.py over the same flash_api.cpp):
  fp16 / bf16 only; head dim a multiple of 8, at most 256; GQA native; int32 cu_seqlens of batch + 1; every
  sequence within max_seqlen_q / max_seqlen_k (the kernels size their grid by them and skip the rest); the window
  rules (`fa2_window`): causal sets right = 0, a side >= max_seqlen_k becomes -1 (unbounded), then one side bounded
  and the other -1 makes the -1 side max_seqlen_k, NOT unbounded; causal and windows aligned to each sequence's
  bottom-right corner; lse float32 [H, total_q]; rows that see no key: out 0, lse +inf; rows outside every
  sequence never written (NaN here); flash-attn's backward writes into the dq, dk, dv it is given.
- `aten._scaled_dot_product_flash_attention` / `_backward` (torch: aten/src/ATen/native/transformers/cuda/
  attention.cu, attention_backward.cu; FA2 `mha_fwd` / `mha_bwd`): fp16 / bf16; [B, H, L, D] in, out a transposed
  view of a [B, L, H, D] buffer; causal bottom-right; lse float32 [B, H, Lq], which the backward reads as a
  contiguous buffer through a raw pointer (a strided one is refused here, read wrongly there).
- `aten._scaled_dot_product_efficient_attention` / `_backward` (torch: attention.cu, attention_backward.cu;
  mem_eff_attention/kernel_forward.h, kernel_backward.h `check_supported`): fp16 / bf16 / fp32; as many key heads
  as query heads; an additive bias whose row stride is a multiple of 16; causal top-left; lse float32 [B, H, Lq
  rounded up to 32]; rows whose bias hides every key: out 0, lse -inf; the backward's checks "LSE is not correctly
  aligned (strideH / strideB)": lse batch and head strides multiples of 8.
- `aten._scaled_dot_product_cudnn_attention` / `_backward` (torch: aten/src/ATen/native/transformers/cuda/
  attention.cu, attention_backward.cu, cudnn/MHA.cpp; measured in gpu_2026-12.md): fp16 / bf16; GQA native; causal
  aligned top-left when lengths differ; lse float32 [B, H, Lq, 1]; the backward takes the caller's out and lse;
  grad_out strided like out (pytorch#176915: a backward stride assert otherwise; modelled conservatively).

Results are exact math (no flash tiling), so a plan that is right gives the float64 answer to the inputs' rounding,
and a plan that relies on something the real op does not do gives a wrong answer here too. A GPU test
(tests/gpu/test_standin_matches_cuda.py) runs each stand-in beside its real op so that the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch

_state = {"active": None, "flash_attn": False, "cudnn": True, "float64": False}  # active None: the environment
HALF = (torch.float16, torch.bfloat16)


def active() -> bool:
    if _state["active"] is None:
        return os.environ.get("HF_SEQPAR_CUDA_STANDIN", "0").lower() in ("1", "true", "yes", "on")
    return _state["active"]


def flash_attn_installed() -> bool:
    """Whether the stand-in plays an installed flash-attn package too."""
    return active() and _state["flash_attn"]


def cudnn_installed() -> bool:
    """Whether the stand-in plays a GPU with torch's cuDNN SDPA ops (by default it does, as an H100 / H200)."""
    return active() and _state["cudnn"]


def float64_varlen() -> bool:
    """Test-only widening: the varlen stand-ins also take float64, so plans can be checked to 1e-12."""
    return active() and _state["float64"]


@contextlib.contextmanager
def cuda_standin(enabled: bool = True, *, flash_attn: bool = False, cudnn: bool = True, float64: bool = False):
    """Run the CUDA dispatch on CPU tensors through the stand-ins (`flash_attn=True`: as if flash-attn were
    installed, so backend='auto' / 'flash_attn' pick it; `cudnn=False`: a GPU without cuDNN's SDPA ops;
    `float64=True`: the varlen ops take float64 too, which the real ones do not, for exactness tests of plans)."""
    saved = dict(_state)
    _state.update(active=enabled, flash_attn=flash_attn, cudnn=cudnn, float64=float64)
    try:
        yield
    finally:
        _state.update(saved)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)  # the real ops raise RuntimeError (TORCH_CHECK) with these texts


# ------------------------------------------------------------------------------------------------ shared math


def _math(q, k, v, allowed, scale, softcap):
    """One sequence: q [Lq, H, D], k/v [Lk, Hkv, D], allowed [Lq, Lk] (bool) -> out [Lq, H, Dv], lse [H, Lq] in
    float32 / float64, -inf on rows that see no key (their out 0)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kx, vx = k.to(dt).repeat_interleave(group, 1), v.to(dt).repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.to(dt), kx) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, vx), lse


def _math_grads(dout, q, k, v, out, lse, allowed, scale, softcap):
    """Gradients of one sequence from the given (final) out and lse [H, Lq], as the flash backward computes them."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    qx, kx, vx = q.to(dt), k.to(dt).repeat_interleave(group, 1), v.to(dt).repeat_interleave(group, 1)
    raw = torch.einsum("qhd,khd->hqk", qx, kx) * scale
    t = torch.tanh(raw / softcap) if softcap else None
    s = (softcap * t if softcap else raw).masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - lse.to(dt)[..., None])  # lse +inf (no key) -> p 0
    do = dout.to(dt)
    delta = (do * out.to(dt)).sum(-1).transpose(0, 1)  # [H, Lq]
    dv = torch.einsum("hqk,qhd->khd", p, do)
    ds = p * (torch.einsum("qhd,khd->hqk", do, vx) - delta[..., None])
    if softcap:
        ds = ds * (1 - t * t)
    dq = torch.einsum("hqk,khd->qhd", ds, kx) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, qx) * scale
    fold = lambda x: x.reshape(x.shape[0], hkv, group, -1).sum(2)  # noqa: E731  GQA: sum a key head's queries
    return dq, fold(dk), fold(dv)


def _band(nq: int, nk: int, left: int, right: int, causal: bool, device) -> torch.Tensor:
    """FA2's mask of one sequence: bottom-right aligned; left / right < 0 are unbounded."""
    row = torch.arange(nq, device=device)[:, None] + (nk - nq)
    col = torch.arange(nk, device=device)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        return allowed & (col <= row)
    if left >= 0:
        allowed &= col >= row - left
    if right >= 0:
        allowed &= col <= row + right
    return allowed


# --------------------------------------------------------------------------------------------- FA2 varlen ops


def fa2_window(causal: bool, left: int, right: int, max_q: int, max_k: int, *, forward: bool) -> tuple:
    """The (causal, left, right) FA2 computes with, after mha_varlen_fwd/bwd and set_params_fprop's rewrites."""
    if forward and max_q == 1:
        causal = False  # "causal=true is the same as causal=false in this case"
    if causal:
        right = 0
    left = -1 if left >= max_k else left
    right = -1 if right >= max_k else right
    causal = left < 0 and right == 0
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k  # NOT unbounded: max_seqlen_k, measured from each sequence's bottom-right corner
    return causal, left, right


def _varlen_checks(q, k, v, cu_q, cu_k, max_q, max_k) -> list[tuple[int, int, int, int]]:
    _check(q.dtype in HALF or float64_varlen(), "FlashAttention only support fp16 and bf16 data type")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key must have the same dtype")
    _check(all(t.stride(-1) == 1 for t in (q, k, v)), "Input tensor must have contiguous last dimension")
    _check(q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, "FlashAttention only supports head dimension at most 256")
    _check(v.shape[-1] == q.shape[-1] == k.shape[-1], "q, k, v must have the same head dimension")
    _check(q.shape[1] % k.shape[1] == 0, "Number of heads in key/value must divide number of heads in query")
    _check(cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, "cu_seqlens_q must have dtype int32")
    _check(cu_q.shape == cu_k.shape and cu_q.dim() == 1, "cu_seqlens_k must have shape (batch_size + 1)")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    seqs = list(zip(cq, cq[1:], ck, ck[1:], strict=False))
    for qa, qb, ka, kb in seqs:
        # not checked by the real op: a longer sequence than max_seqlen_* is silently cut by the kernel's grid
        _check(0 <= qb - qa <= max_q and 0 <= kb - ka <= max_k, "stand-in: a sequence exceeds max_seqlen_q / _k")
    _check(cq[-1] <= q.shape[0] and ck[-1] <= k.shape[0], "stand-in: cu_seqlens run past the tensors")
    return seqs


def _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap):
    seqs = _varlen_checks(q, k, v, cu_q, cu_k, max_q, max_k)
    causal, left, right = fa2_window(causal, left, right, max_q, max_k, forward=True)
    out = torch.full_like(q, float("nan"))  # at::empty: rows outside every sequence are never written
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.promote_types(q.dtype, torch.float32))
    for qa, qb, ka, kb in seqs:
        if qa == qb:
            continue
        allowed = _band(qb - qa, kb - ka, left, right, causal, q.device)
        o, s = _math(q[qa:qb], k[ka:kb], v[ka:kb], allowed, scale, softcap)
        out[qa:qb] = o.to(q.dtype)
        lse[:, qa:qb] = torch.where(torch.isneginf(s), float("inf"), s).to(lse.dtype)  # FA2: +inf on empty rows
    return out, lse


def _varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap):
    seqs = _varlen_checks(q, k, v, cu_q, cu_k, max_q, max_k)
    _check(out.dtype == q.dtype and dout.dtype == q.dtype, "query and out must have the same dtype")
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    _check(lse.dtype == lse_dtype and lse.shape == (q.shape[1], q.shape[0]), "softmax_lse must be [H, total_q]")
    causal, left, right = fa2_window(causal, left, right, max_q, max_k, forward=False)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    for qa, qb, ka, kb in seqs:
        if qa == qb or ka == kb:
            grads[0][qa:qb] = 0
            grads[1][ka:kb] = 0
            grads[2][ka:kb] = 0
            continue
        allowed = _band(qb - qa, kb - ka, left, right, causal, q.device)
        g = _math_grads(dout[qa:qb], q[qa:qb], k[ka:kb], v[ka:kb], out[qa:qb], lse[:, qa:qb], allowed, scale, softcap)
        for dst, src, (a, b) in zip(grads, g, ((qa, qb), (ka, kb), (ka, kb)), strict=True):
            dst[a:b] = src.to(q.dtype)
    return grads


def _flash_attention_forward(
    query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
    scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None,
    num_splits=None,
):  # fmt: skip
    """aten._flash_attention_forward, varlen form -> (out, lse [H, total_q], rng_state, unused, debug_mask)."""
    _check(cum_seq_q is not None, "stand-in: only the varlen form (cu_seqlens given) is modelled")
    _check(dropout_p == 0.0 and seqused_k is None and alibi_slopes is None, "stand-in: no dropout / seqused / alibi")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    out, lse = _varlen_fwd(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, scale, is_causal, left, right, 0.0)
    empty = torch.empty(0)
    return out, lse, torch.empty(2, dtype=torch.uint64), empty, empty


def _flash_attention_backward(
    grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None,
):  # fmt: skip
    """aten._flash_attention_backward, varlen form -> (dq, dk, dv)."""
    _check(dropout_p == 0.0, "stand-in: no dropout")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    args = (grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k)
    return tuple(_varlen_bwd(*args, scale, is_causal, left, right, 0.0))


def flash_attn_varlen_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
    window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
    block_table=None, leftpad_k=None, seqused_k=None,
):  # fmt: skip
    """flash_attn.flash_attn_interface._flash_attn_varlen_forward (>= 2.6) -> (out, lse, S_dmask, rng_state)."""
    _check(dropout_p == 0.0 and alibi_slopes is None and block_table is None, "stand-in: no dropout / alibi / paging")
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    out, lse = _varlen_fwd(*args, window_size_left, window_size_right, softcap)
    return out, lse, None, torch.empty(2, dtype=torch.uint64)


def flash_attn_varlen_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
    deterministic=False, rng_state=None,
):  # fmt: skip
    """flash_attn.flash_attn_interface._flash_attn_varlen_backward (>= 2.6): writes dq, dk, dv in place."""
    _check(dropout_p == 0.0 and alibi_slopes is None, "stand-in: no dropout / alibi")
    for given, like in ((dq, q), (dk, k), (dv, v)):
        _check(given.shape == like.shape and given.dtype == like.dtype, "dq must have the same dtype as q")
    args = (dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    grads = _varlen_bwd(*args, softmax_scale, causal, window_size_left, window_size_right, softcap)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dq[cq[0] : cq[-1]] = grads[0][cq[0] : cq[-1]]  # only rows of the sequences are written
    dk[ck[0] : ck[-1]] = grads[1][ck[0] : ck[-1]]
    dv[ck[0] : ck[-1]] = grads[2][ck[0] : ck[-1]]
    return torch.empty(0)  # softmax_d


FLASH_ATTN_PARAMS = tuple(  # what _compat reads off flash-attn's signatures
    set(inspect.signature(fn).parameters) for fn in (flash_attn_varlen_forward, flash_attn_varlen_backward)
)


# ------------------------------------------------------------------------------------------------ dense SDPA ops


def _dense(q, k, v, scale, causal, top_left: bool, bias):
    """[B, H, L, D] inputs -> out [B, L, H, Dv] buffer (float32/64), lse [B, H, Lq]."""
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    row = torch.arange(lq)[:, None] + (0 if top_left else lk - lq)
    allowed = (torch.arange(lk)[None, :] <= row) if causal else torch.ones(lq, lk, dtype=torch.bool)
    outs, lses = [], []
    for i in range(b):
        ok = allowed
        if bias is not None:  # additive: -inf hides a key; finite values would need adding, the package sends 0/-inf
            bias_i = bias[i if bias.shape[0] > 1 else 0]
            _check(bool(torch.all((bias_i == 0) | torch.isneginf(bias_i))), "stand-in: bias other than 0 / -inf")
            ok = ok & ~torch.isneginf(bias_i[0])
            _check(bool(torch.all(bias_i == bias_i[:1])), "stand-in: a bias that differs between heads")
        o, s = _math(q[i].transpose(0, 1), k[i].transpose(0, 1), v[i].transpose(0, 1), ok, scale, 0.0)
        outs.append(o)
        lses.append(s)
    return torch.stack(outs), torch.stack(lses)


def _scaled_dot_product_flash_attention(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False,
                                        *, scale=None):  # fmt: skip
    """-> (out, lse [B, H, Lq], cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_mask)."""
    _check(query.dtype in HALF, "FlashAttention only support fp16 and bf16 data type")
    _check(query.shape[1] % key.shape[1] == 0, "Number of heads in key/value must divide number of heads in query")
    _check(query.shape[-1] % 8 == 0 and query.shape[-1] <= 256, "FlashAttention only supports head dim <= 256")
    _check(dropout_p == 0.0, "stand-in: no dropout")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _dense(query, key, value, scale, is_causal, top_left=False, bias=None)
    out = out.to(query.dtype).transpose(1, 2)  # FA2 writes [B, L, H, D]; SDPA hands back the transposed view
    lse = torch.where(torch.isneginf(lse), float("inf"), lse).float().contiguous()
    empty = torch.empty(0)
    return out, lse, None, None, query.shape[2], key.shape[2], torch.empty(2, dtype=torch.uint64), empty, empty


def _scaled_dot_product_flash_attention_backward(
    grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    philox_seed, philox_offset, *, scale=None,
):  # fmt: skip
    _check(query.dtype in HALF, "FlashAttention only support fp16 and bf16 data type")
    b, h, lq, _ = query.shape
    # mha_bwd reads softmax_lse through a raw pointer as a contiguous [B, H, Lq] float32 buffer
    _check(logsumexp.dtype == torch.float32 and logsumexp.shape == (b, h, lq), "softmax_lse must be [B, H, Lq]")
    _check(logsumexp.is_contiguous(), "stand-in: FA2 reads softmax_lse as a contiguous buffer")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _dense_grads(grad_out, query, key, value, out, logsumexp, scale, is_causal, False, None)


def _dense_grads(dout, q, k, v, out, lse, scale, causal, top_left, bias):
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    row = torch.arange(lq)[:, None] + (0 if top_left else lk - lq)
    allowed = (torch.arange(lk)[None, :] <= row) if causal else torch.ones(lq, lk, dtype=torch.bool)
    grads = [[], [], []]
    for i in range(b):
        ok = allowed if bias is None else allowed & ~torch.isneginf(bias[i if bias.shape[0] > 1 else 0][0])
        tr = [t[i].transpose(0, 1) for t in (dout, q, k, v, out)]
        for acc, g in zip(grads, _math_grads(*tr, lse[i, :, :lq], ok, scale, 0.0), strict=True):
            acc.append(g.transpose(0, 1))
    return tuple(torch.stack(g).to(q.dtype) for g in grads)


def _scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                                            is_causal=False, *, scale=None):  # fmt: skip
    """-> (out, lse [B, H, Lq rounded up to 32] float32, philox_seed, philox_offset)."""
    _check(query.dtype in (*HALF, torch.float32), "mem-efficient attention: fp16, bf16 or fp32 inputs")
    _check(key.shape[1] == query.shape[1], "stand-in: the mem-efficient kernel takes as many key heads as queries")
    _check(dropout_p == 0.0, "stand-in: no dropout")
    if attn_bias is not None:
        _check(attn_bias.dtype == query.dtype, "invalid dtype for bias - should match query's dtype")
        _check(attn_bias.stride(-1) == 1, "attn_bias must have a contiguous last dimension")
        _check(query.shape[2] <= 1 or attn_bias.stride(-2) % 16 == 0, "attn_bias is not correctly aligned (strideM)")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _dense(query, key, value, scale, is_causal, top_left=True, bias=attn_bias)
    b, h, lq = lse.shape
    padded = torch.full((b, h, -(-lq // 32) * 32), float("inf"), dtype=torch.float32)
    padded[..., :lq] = lse  # -inf on rows the bias hides entirely (their out is 0)
    return out.to(query.dtype).transpose(1, 2), padded, torch.empty(()), torch.empty(())


def _scaled_dot_product_efficient_attention_backward(
    grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p,
    grad_input_mask, is_causal=False, *, scale=None,
):  # fmt: skip
    b, h, lq, _ = query.shape
    _check(h <= 1 or logsumexp.stride(1) % 8 == 0, "LSE is not correctly aligned (strideH)")
    _check(b <= 1 or logsumexp.stride(0) % 8 == 0, "LSE is not correctly aligned (strideB)")
    _check(logsumexp.dtype == torch.float32 and logsumexp.shape[-1] >= lq, "logsumexp must cover every query row")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv = _dense_grads(grad_out_, query, key, value, out, logsumexp, scale, is_causal, True, attn_bias)
    return dq, dk, dv, None


def _scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                                        is_causal=False, return_debug_mask=False, *, scale=None):  # fmt: skip
    """-> (out, lse [B, H, Lq, 1] float32, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug)."""
    _check(query.dtype in HALF, "cuDNN SDPA: fp16 or bf16 inputs")
    _check(query.shape[1] % key.shape[1] == 0, "cuDNN SDPA: key heads must divide query heads")
    _check(attn_bias is None and dropout_p == 0.0, "stand-in: no bias (pytorch#196678) and no dropout")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _dense(query, key, value, scale, is_causal, top_left=True, bias=None)
    empty = torch.empty(0)
    out = out.to(query.dtype).transpose(1, 2)
    return out, lse.float().contiguous()[..., None], empty, empty, query.shape[2], key.shape[2], empty, empty, empty


def _scaled_dot_product_cudnn_attention_backward(
    grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q, cum_seq_k,
    max_q, max_k, dropout_p, is_causal, *, scale=None,
):  # fmt: skip
    b, h, lq, _ = query.shape
    _check(query.dtype in HALF and out.dtype == query.dtype, "cuDNN SDPA: fp16 or bf16 inputs")
    _check(grad_out.stride() == out.stride(), "stand-in: cuDNN's backward wants grad_out strided like out")
    _check(logsumexp.dtype == torch.float32 and logsumexp.shape == (b, h, lq, 1), "logsumexp must be [B, H, Lq, 1]")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _dense_grads(grad_out, query, key, value, out, logsumexp[..., 0], scale, is_causal, True, None)
