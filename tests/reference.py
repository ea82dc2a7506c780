"""Plain single-device references the tests compare against. Written independently of hf_seqpar's kernels."""

from __future__ import annotations

import torch


def visible(seq_len: int, causal: bool, window: int | None, cu_seqlens_rows) -> torch.Tensor:
    """[rows, S, S] boolean: may query i attend key j. Built pair by pair from the rule, on purpose naively."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    base = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        base &= j <= i
    if window is not None:
        base &= (i - j).abs() < window if not causal else (i - j) < window
    if cu_seqlens_rows is None:
        return base[None]
    rows = []
    for offsets in cu_seqlens_rows:
        doc = torch.zeros(seq_len, dtype=torch.long)
        for d, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            doc[a:b] = d
        rows.append(base & (doc[:, None] == doc[None, :]))
    return torch.stack(rows)


def attention(q, k, v, *, causal=True, scale=None, window=None, softcap=None, cu_seqlens_rows=None, sinks=None):
    """Full attention on [B, S, H, D] inputs with GQA, masks, softcap and sinks, by the textbook formula."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visible(s, causal, window, cu_seqlens_rows)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if sinks is not None:
        sink_col = sinks[None, :, None, None].expand(b, h, s, 1)
        probs = torch.cat([scores, sink_col], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
