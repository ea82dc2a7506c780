"""Which keys a block of queries may see, decided from global positions on the host.

A block pairs a run of query positions with a run of key positions. Its mask is the AND of
- causal: key j <= query i;
- sliding window w: i - w < j (causal) or |i - j| < w (non-causal);
- packed documents: doc(i) == doc(j), documents given per batch row as offsets (cu_seqlens).
Most blocks are EMPTY, FULL or the aligned CAUSAL triangle, which fused kernels serve without a mask tensor;
only the rest (MIXED) get a dense boolean mask, built for that block alone.
"""

from __future__ import annotations

import bisect
import enum
import functools
from dataclasses import dataclass

import torch

from ..layout import Segment


class BlockKind(enum.Enum):
    EMPTY = "empty"
    FULL = "full"
    CAUSAL = "causal"  # square block on the diagonal: query i sees keys <= i
    MIXED = "mixed"


@dataclass(frozen=True)
class MaskSpec:
    """The attention rule for one sequence (shared by every block). `docs`: per batch row, sorted document
    start offsets ending with the sequence length (cu_seqlens); one row is broadcast to every batch row.

    Hashable with its hash computed once: block plans are cached by (runs, spec) and looked up by every layer."""

    causal: bool = True
    window: int | None = None
    docs: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.causal, self.window, self.docs)))

    def __hash__(self) -> int:
        return self._hash

    def doc_span(self, row: tuple[int, ...], seg: Segment) -> tuple[int, int]:
        """Indices of the first and last document touched by `seg`."""
        return bisect.bisect_right(row, seg.start) - 1, bisect.bisect_right(row, seg.end - 1) - 1

    def reach(self, q: Segment) -> tuple[int, int]:
        """Positions [lo, hi) outside which no key is visible to any query of `q`."""
        lo, hi = 0, None
        if self.causal:
            hi = q.end
        if self.window is not None:
            lo = max(lo, q.start - self.window + 1)
            if not self.causal:
                hi = q.end + self.window - 1
        if self.docs is not None:
            lo = max(lo, min(row[self.doc_span(row, q)[0]] for row in self.docs))
            doc_end = max(row[self.doc_span(row, q)[1] + 1] for row in self.docs)
            hi = doc_end if hi is None else min(hi, doc_end)
        return lo, (hi if hi is not None else 1 << 62)

    def classify(self, q: Segment, k: Segment) -> BlockKind:
        lo, hi = q.start - (k.end - 1), (q.end - 1) - k.start  # smallest and largest i - j in the block
        if self.causal and hi < 0:
            return BlockKind.EMPTY
        if self.window is not None and (lo >= self.window or (not self.causal and -hi >= self.window)):
            return BlockKind.EMPTY
        one_doc = True
        if self.docs is not None:
            spans = [(self.doc_span(row, q), self.doc_span(row, k)) for row in self.docs]
            if all(qs[1] < ks[0] or ks[1] < qs[0] for qs, ks in spans):
                return BlockKind.EMPTY
            one_doc = all(qs[0] == qs[1] == ks[0] == ks[1] for qs, ks in spans)
        in_window = self.window is None or (hi < self.window and (self.causal or -lo < self.window))
        if one_doc and in_window and (not self.causal or lo >= 0):
            return BlockKind.FULL
        if one_doc and in_window and self.causal and q == k:
            return BlockKind.CAUSAL
        return BlockKind.MIXED

    def dense(self, q: Segment, k: Segment, device: torch.device) -> torch.Tensor:
        """Boolean mask [rows, q.length, k.length] (rows = 1 or batch); True = may attend. Built from host
        integers only (no host-to-device copy, so no device sync)."""
        i = torch.arange(q.start, q.end, device=device)[:, None]
        j = torch.arange(k.start, k.end, device=device)[None, :]
        allowed = torch.ones(q.length, k.length, dtype=torch.bool, device=device)
        if self.causal:
            allowed &= j <= i
        if self.window is not None:
            allowed &= (i - j) < self.window
            if not self.causal:
                allowed &= (j - i) < self.window
        if self.docs is None:
            return allowed[None]
        rows = []
        for row in self.docs:
            same_doc = torch.zeros_like(allowed)
            first, last = self.doc_span(row, q)
            for d in range(first, last + 1):  # documents touching both runs: their rectangle is allowed
                lo, hi = max(row[d], k.start), min(row[d + 1], k.end)
                if lo < hi:
                    same_doc[
                        max(row[d], q.start) - q.start : min(row[d + 1], q.end) - q.start, lo - k.start : hi - k.start
                    ] = True
            rows.append(allowed & same_doc)
        return torch.stack(rows)


@dataclass(frozen=True)
class DocumentOffsets:
    """Packed-document offsets of one batch, held on the host: per batch row, cu_seqlens into the full padded row
    (0 ... S). Not a tensor, so Trainer / accelerate leave it where it is when they move a batch to the GPU, and
    attention reads it without a device-to-host sync. Hashable (its hash computed once)."""

    rows: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.rows))

    def __hash__(self) -> int:
        return self._hash

    def to(self, *args, **kwargs) -> DocumentOffsets:
        """Stays on the host: `{k: v.to(device) for k, v in batch.items()}` loops and accelerate keep working."""
        return self

    @classmethod
    def from_padded(cls, offsets) -> DocumentOffsets:
        """From a host [B, K] int tensor / nested list whose short rows repeat the last offset (the collator's
        `seqpar_cu_seqlens` format)."""
        rows = []
        for row in offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets:
            row = [int(x) for x in row]
            while len(row) > 2 and row[-1] == row[-2]:
                row.pop()
            rows.append(tuple(row))
        return cls(tuple(rows))


def docs_from_cu_seqlens(cu_seqlens, seq_len: int):
    """Validate offsets and return them as host tuples (one per batch row), or None.

    Accepts a `DocumentOffsets`, nested tuples / lists, or a tensor. Host inputs are validated once per distinct
    value (cached): every layer of a step passes the same offsets. A tensor on the GPU costs a device sync here;
    pass `DocumentOffsets` to avoid it."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, DocumentOffsets):
        return _validated(cu_seqlens.rows, seq_len)
    if isinstance(cu_seqlens, torch.Tensor):
        rows = cu_seqlens.tolist()
        rows = rows if cu_seqlens.dim() == 2 else [rows]
    else:
        rows = list(cu_seqlens)
        if rows and not isinstance(rows[0], list | tuple | torch.Tensor):
            rows = [rows]
        rows = [r.tolist() if isinstance(r, torch.Tensor) else r for r in rows]
    return _validated(tuple(tuple(int(x) for x in row) for row in rows), seq_len)


@functools.lru_cache(maxsize=64)
def _validated(rows: tuple[tuple[int, ...], ...], seq_len: int) -> tuple[tuple[int, ...], ...]:
    for offsets in rows:
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != seq_len:
            raise ValueError(
                f"hf_seqpar: cu_seqlens must start at 0 and end at the full sequence length {seq_len}; got "
                f"{list(offsets)[:8]}"
            )
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise ValueError(f"hf_seqpar: cu_seqlens must be strictly increasing; got {list(offsets)[:16]}")
    return rows
