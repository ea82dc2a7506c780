"""The attention and sharding entry points of ../shared/API.md: pick the algorithm, check the inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import layout
from ..config import SeqParConfig
from ..kernels import MaskSpec, docs_from_cu_seqlens, resolve_backend
from ..mesh import SeqParGroups
from ._compat import all_gather_flat
from .allgather import AllGatherAttention
from .ring import AttnArgs, RingAttention
from .ulysses import ulysses_attention


def _placement(seq_len: int, config: SeqParConfig, groups: SeqParGroups) -> layout.Placement:
    return layout.Placement.build(seq_len, groups.sp_size, config.resolved_layout)


def shard_sequence(x: torch.Tensor, *, config: SeqParConfig, groups: SeqParGroups, dim: int = 1) -> torch.Tensor:
    """Full sequence (identical on every rank of the SP group) -> this rank's shard along `dim`."""
    return layout.shard(x, _placement(x.shape[dim], config, groups), groups.sp_rank, dim)


def gather_sequence(local: torch.Tensor, *, config: SeqParConfig, groups: SeqParGroups, dim: int = 1) -> torch.Tensor:
    """Inverse of `shard_sequence`, on every rank (not differentiable)."""
    if groups.sp_size == 1:
        return local
    moved = local.movedim(dim, 0).contiguous()
    flat = torch.empty((groups.sp_size * moved.shape[0],) + moved.shape[1:], dtype=moved.dtype, device=moved.device)
    all_gather_flat(flat, moved, groups.sp_group)
    placement = _placement(flat.shape[0], config, groups)
    return layout.unshard([flat], placement, dim=0).movedim(0, dim)


def _check_inputs(q, k, v, sinks, window, softcap) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"hf_seqpar: expected q [batch, seq_local, heads_q, head_dim] and k, v [batch, seq_local, heads_kv, "
            "head_dim] "
            f"(v may have its own head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"hf_seqpar: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, seq_local or head_dim"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"hf_seqpar: heads_q={q.shape[2]} must be a multiple of heads_kv={k.shape[2]} (GQA/MQA)")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"hf_seqpar: window={window!r} must be a positive integer or None")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"hf_seqpar: softcap={softcap!r} must be positive or None")
    if sinks is not None and tuple(sinks.shape) != (q.shape[2],):
        raise ValueError(f"hf_seqpar: sinks must have shape (heads_q,) = ({q.shape[2]},); got {tuple(sinks.shape)}")


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype torch's SDPA computes in for these inputs: under autocast the autocast dtype (float64 is never
    cast), otherwise the inputs' own dtype, which must then be common (SDPA refuses a mix too)."""
    device = q.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    dtypes = {x.dtype if low is None or x.dtype == torch.float64 else low for x in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError(
            f"hf_seqpar: q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}"
            + ("" if low is None else f" under autocast({low})")
            + "; attention needs one dtype: cast them, or run under torch.autocast as Trainer(bf16=True) does"
        )
    return dtypes.pop()


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: SeqParConfig,
    groups: SeqParGroups,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over the full sequence, computed on shards: returns this rank's shard of the output.

    q [batch, seq_local, heads_q, head_dim]; k, v [batch, seq_local, heads_kv, head_dim], cut by `shard_sequence`
    with the same config. `cu_seqlens`: packed-document offsets into the FULL sequence (int [n_docs + 1], or one
    row per batch element). `window`: query i sees keys j with i - window < j <= i. `softcap`: s -> c*tanh(s/c).
    `sinks`: per-head sink logits (GPT-OSS), differentiable. v may have a head_dim of its own (MLA).

    Under torch.autocast the attention computes in the autocast dtype, as SDPA would; partial results merge in
    float32 whatever the dtype, and the output has the compute dtype.
    """
    _check_inputs(q, k, v, sinks, window, softcap)
    dtype = compute_dtype(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if qk_dim != v_dim:  # zero columns change no score and no output column: pad to one head_dim, slice after
        width = max(qk_dim, v_dim)
        q, k, v = (F.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    # The kernels choose their precision themselves (fp32 lse and merge); autocast must not recast inside them.
    with torch.autocast(q.device.type, enabled=False):
        out = _attention(
            q.to(dtype), k.to(dtype), v.to(dtype), sinks, config, groups, causal, scale, cu_seqlens, window, softcap
        )
    return out[..., :v_dim] if out.shape[-1] != v_dim else out


def _attention(q, k, v, sinks, config, groups, causal, scale, cu_seqlens, window, softcap):
    batch, seq_local, heads_q, head_dim = q.shape
    cfg = config.resolve(heads_q, k.shape[2])
    if groups.sp_size != cfg.sp_size:
        raise ValueError(f"hf_seqpar: config.sp_size={cfg.sp_size} but the groups have sp_size={groups.sp_size}")
    seq_len = seq_local * groups.sp_size
    placement = _placement(seq_len, cfg, groups)
    docs = docs_from_cu_seqlens(cu_seqlens, seq_len)
    if docs is not None and len(docs) not in (1, batch):
        raise ValueError(
            f"hf_seqpar: cu_seqlens has {len(docs)} rows for batch size {batch}; give 1 row or one per row"
        )
    args = AttnArgs(
        spec=MaskSpec(causal=causal, window=window, docs=docs),
        scale=scale,
        softcap=softcap,
        backend=resolve_backend(cfg.backend, q),
    )
    if groups.sp_size == 1:
        return RingAttention.apply(q, k, v, sinks, None, placement, args)
    if cfg.mode == "allgather":
        return AllGatherAttention.apply(q, k, v, sinks, groups.sp_group, placement, args)
    if cfg.split[0] == 1:  # ring, or usp with ulysses_size=1
        return RingAttention.apply(q, k, v, sinks, groups.sp_group, placement, args)
    ulysses_group, ring_group = groups.split_groups(cfg.split[0])
    return ulysses_attention(
        q,
        k,
        v,
        sinks,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        placement=placement,
        sp_rank=groups.sp_rank,
        args=args,
    )
