"""Block plans: which (query rows, key rows) pairs one attention call computes, decided on the host, once.

A plan depends only on host data (the query and key runs, the mask spec, the batch size), never on tensor values,
so it is cached by those: the first layer of a step builds it, every other layer, ring hop and the backward reuse
it. Two kinds:
- `block_plan`: tiles cut at run, document and window boundaries, each EMPTY / FULL / CAUSAL / MIXED; one kernel
  call per tile (the CPU and float32 paths, and the exact math path);
- `varlen_plan`: the same work as a few `VarlenRound`s, each one variable-length flash call (flash-attn or torch's
  vendored FA2) over the whole batch, whatever the number of packed documents.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..layout import Segment
from .mask import BlockKind, MaskSpec

PLAN_CACHE_SIZE = 256  # distinct (runs, spec) per step: hops x specs x ranks of a group; old steps fall out


# ----------------------------------------------------------------------------------------------- block plan


def _split(segs: tuple[Segment, ...], cuts: list[int], window: int | None) -> list[tuple[int, Segment]]:
    """Cut runs at `cuts` (and at multiples of the window) -> (offset in the tensor, run) tiles."""
    tiles, offset = [], 0
    for seg in segs:
        points = {seg.start, seg.end}
        points.update(cuts[bisect.bisect_right(cuts, seg.start) : bisect.bisect_left(cuts, seg.end)])
        if window is not None:
            points.update(range(-(-seg.start // window) * window, seg.end, window))
        points = sorted(points)
        tiles += [(offset + a - seg.start, Segment(a, b - a)) for a, b in zip(points, points[1:], strict=False)]
        offset += seg.length
    return tiles


def _pairs(q_segs, k_segs, spec: MaskSpec):
    """(query slice, key slice, kind, q run, k run) for every block that is not fully masked.

    Both sides are cut at each other's run boundaries, at document starts and at multiples of the window, so
    that almost every block is EMPTY, FULL or CAUSAL; neighbouring FULL key tiles are served as one block.
    Only key tiles inside the reach of a query tile (its documents, its window, the causal limit) are looked at.
    """
    cuts = {p for seg in q_segs + k_segs for p in (seg.start, seg.end)}
    if spec.docs is not None:
        cuts.update(p for row in spec.docs for p in row)
    cuts = sorted(cuts)
    k_tiles = sorted(_split(k_segs, cuts, spec.window), key=lambda t: t[1].start)
    k_starts = [t[1].start for t in k_tiles]
    for q_off, qs in _split(q_segs, cuts, spec.window):
        lo, hi = spec.reach(qs)
        run = None  # (k slice start, k slice stop, merged k run) of consecutive FULL tiles
        for k_off, ks in k_tiles[max(bisect.bisect_right(k_starts, lo) - 1, 0) : bisect.bisect_left(k_starts, hi)]:
            kind = spec.classify(qs, ks)
            if kind is BlockKind.FULL and run and run[1] == k_off and run[2].end == ks.start:
                run = (run[0], k_off + ks.length, Segment(run[2].start, run[2].length + ks.length))
                continue
            if run:
                yield slice(q_off, q_off + qs.length), slice(run[0], run[1]), BlockKind.FULL, qs, run[2]
                run = None
            if kind is BlockKind.FULL:
                run = (k_off, k_off + ks.length, ks)
            elif kind is not BlockKind.EMPTY:
                yield slice(q_off, q_off + qs.length), slice(k_off, k_off + ks.length), kind, qs, ks
        if run:
            yield slice(q_off, q_off + qs.length), slice(run[0], run[1]), BlockKind.FULL, qs, run[2]


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def block_plan(q_segs: tuple[Segment, ...], k_segs: tuple[Segment, ...], spec: MaskSpec) -> tuple:
    """The tiles of `_pairs`, built once per distinct (runs, spec)."""
    return tuple(_pairs(q_segs, k_segs, spec))


# ---------------------------------------------------------------------------------------------- varlen plan


class Pair(NamedTuple):
    """Query rows [qa, qb) against key rows [ka, kb) of the flattened batch, with flash-attn's window (left, right)
    relative to the bottom-right diagonal (-1 = unbounded): key kj of query qi is visible iff
    qi + (nk - nq) - left <= kj <= qi + (nk - nq) + right."""

    qa: int
    qb: int
    ka: int
    kb: int
    left: int
    right: int


@dataclass(frozen=True)
class VarlenRound:
    """One varlen kernel call: query rows q_range and key rows k_range of the flattened [batch * len] tensors, cut
    into sequences by cu_q / cu_k (relative to the range starts). Gaps between real pairs are filler sequences with
    no keys (rows: out 0, lse +inf) or no queries, so no tensor is copied to build the call."""

    q_range: tuple[int, int]
    k_range: tuple[int, int]
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    max_q: int
    max_k: int
    left: int
    right: int
    pairs: tuple[Pair, ...]
    _device_cu: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def causal(self) -> bool:
        return self.left == -1 and self.right == 0

    def cu_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 offsets on `device`, made once per plan; copied from pinned memory without blocking the host."""
        key = str(device)
        if key not in self._device_cu:
            host = torch.tensor([self.cu_q, self.cu_k], dtype=torch.int32)
            if torch.device(device).type == "cuda":
                host = host.pin_memory()
            both = host.to(device, non_blocking=True)
            self._device_cu[key] = (both[0], both[1])
        return self._device_cu[key]


def _pieces(segs: tuple[Segment, ...], row: tuple[int, ...] | None) -> dict[int, list[tuple[int, Segment]]]:
    """Document index -> its (offset in the tensor, position run) pieces, in storage order."""
    by_doc: dict[int, list[tuple[int, Segment]]] = {}
    offset = 0
    for seg in segs:
        if row is None:
            by_doc.setdefault(0, []).append((offset, seg))
        else:
            d, pos = bisect.bisect_right(row, seg.start) - 1, seg.start
            while pos < seg.end:
                end = min(seg.end, row[d + 1])
                by_doc.setdefault(d, []).append((offset + pos - seg.start, Segment(pos, end - pos)))
                pos, d = end, d + 1
        offset += seg.length
    return by_doc


def _band(qa, qb, ka, kb, lo, hi):
    """Positions: queries [qa, qb), keys [ka, kb) of one document, key j visible to query i iff lo <= i - j <= hi
    (None = unbounded). Trim rows and keys that see nothing -> Pair in positions, or None when nothing is visible."""
    while True:
        before = (qa, qb, ka, kb)
        if hi is not None:
            ka = max(ka, qa - hi)
            qb = min(qb, kb + hi)
        if lo is not None:
            kb = min(kb, qb - lo)
            qa = max(qa, ka + lo)
        if qa >= qb or ka >= kb:
            return None
        if (qa, qb, ka, kb) == before:
            break
    left = -1 if hi is None or (qb - 1) - ka <= hi else hi - (qb - kb)
    right = -1 if lo is None or qa - (kb - 1) >= lo else (qb - kb) - lo
    return Pair(qa, qb, ka, kb, left, right)


def _flash_safe(p: Pair | None, lo, hi) -> list[Pair]:
    """flash-attn treats right >= max_seqlen_k as unbounded, which is only true when right >= nq - 1. Split off the
    query rows the right bound really cuts until every pair has right < nk (or unbounded)."""
    if p is None:
        return []
    if p.right == -1 or p.right < p.kb - p.ka:
        return [p]
    cut = p.qb - 1 - p.right  # rows from here on see every key of the pair on the right side
    return _flash_safe(_band(p.qa, cut, p.ka, p.kb, lo, hi), lo, hi) + _flash_safe(
        _band(cut, p.qb, p.ka, p.kb, lo, hi), lo, hi
    )


def _row_pairs(q_segs, k_segs, spec: MaskSpec, row) -> list[Pair]:
    """Pairs (in tensor offsets of one batch row) covering every visible (query, key) of the row exactly once."""
    lo = 0 if spec.causal else (None if spec.window is None else 1 - spec.window)
    hi = None if spec.window is None else spec.window - 1
    q_docs, k_docs = _pieces(q_segs, row), _pieces(k_segs, row)
    pairs = []
    for d, q_pieces in q_docs.items():
        k_pieces = k_docs.get(d)
        if not k_pieces:
            continue
        same = [s for _, s in q_pieces] == [s for _, s in k_pieces]
        if same and (spec.window is None or len(q_pieces) == 1):
            # The same positions on both sides, in the same order: the rule in storage order is the rule in
            # positions (causal keeps order; no window to measure distances across a gap between runs).
            n = sum(s.length for _, s in q_pieces)
            left = -1 if hi is None or hi >= n - 1 else hi
            right = 0 if spec.causal else (-1 if hi is None or hi >= n - 1 else hi)
            pairs.append(Pair(q_pieces[0][0], q_pieces[0][0] + n, k_pieces[0][0], k_pieces[0][0] + n, left, right))
            continue
        for q_off, qs in q_pieces:
            for k_off, ks in k_pieces:
                for p in _flash_safe(_band(qs.start, qs.end, ks.start, ks.end, lo, hi), lo, hi):
                    dq, dk = q_off - qs.start, k_off - ks.start  # positions -> tensor offsets
                    pairs.append(Pair(p.qa + dq, p.qb + dq, p.ka + dk, p.kb + dk, p.left, p.right))
    return _coalesce_full(pairs)


def _coalesce_full(pairs: list[Pair]) -> list[Pair]:
    """Merge unmasked pairs that share their query rows and have adjacent key rows (and the transpose)."""
    full = sorted(p for p in pairs if p.left == p.right == -1)
    rest = [p for p in pairs if not p.left == p.right == -1]
    for key, adjacent in ((lambda p: (p.qa, p.qb, p.ka), "k"), (lambda p: (p.ka, p.kb, p.qa), "q")):
        merged: list[Pair] = []
        for p in sorted(full, key=key):
            last = merged[-1] if merged else None
            if last and adjacent == "k" and (last.qa, last.qb, last.kb) == (p.qa, p.qb, p.ka):
                merged[-1] = last._replace(kb=p.kb)
            elif last and adjacent == "q" and (last.ka, last.kb, last.qb) == (p.ka, p.kb, p.qa):
                merged[-1] = last._replace(qb=p.qb)
            else:
                merged.append(p)
        full = merged
    return full + rest


def _round(pairs: list[Pair]) -> VarlenRound:
    q0, k0 = pairs[0].qa, pairs[0].ka
    lengths, q_pos, k_pos = [], q0, k0
    for p in pairs:
        if p.qa > q_pos:  # rows no pair of this round covers: a sequence with no keys
            lengths.append((p.qa - q_pos, 0))
        if p.ka > k_pos:  # keys no pair of this round reads: a sequence with no queries
            lengths.append((0, p.ka - k_pos))
        lengths.append((p.qb - p.qa, p.kb - p.ka))
        q_pos, k_pos = p.qb, p.kb
    cu_q, cu_k = [0], [0]
    for nq, nk in lengths:
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)
    # max_q >= 2: FA2 reinterprets a call whose longest query sequence is 1 (decoding), which the filler breaks
    max_q, max_k = max(2, max(nq for nq, _ in lengths)), max(1, max(nk for _, nk in lengths))
    if pairs[0].left >= 0 and pairs[0].right == -1:
        # FA2 turns the open right side of a left-bounded window into max_seqlen_k, measured from each sequence's
        # bottom-right corner: it reaches every key only if max_seqlen_k >= nq - 1. The bound only sizes the grid.
        max_k = max(max_k, max_q)
    return VarlenRound(
        q_range=(q0, q_pos),
        k_range=(k0, k_pos),
        cu_q=tuple(cu_q),
        cu_k=tuple(cu_k),
        max_q=max_q,
        max_k=max_k,
        left=pairs[0].left,
        right=pairs[0].right,
        pairs=tuple(pairs),
    )


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def varlen_plan(
    q_segs: tuple[Segment, ...], k_segs: tuple[Segment, ...], spec: MaskSpec, batch: int
) -> tuple[VarlenRound, ...]:
    """The varlen calls for [batch, Lq] queries against [batch, Lk] keys: pairs of every row, in flattened offsets,
    grouped by window into rounds whose query rows and key rows both increase (one kernel call each)."""
    lq, lk = sum(s.length for s in q_segs), sum(s.length for s in k_segs)
    rows = [None] * batch if spec.docs is None else spec.docs * batch if len(spec.docs) == 1 else spec.docs
    pairs: list[Pair] = []
    cache: dict = {}
    for b, row in enumerate(rows):
        if row not in cache:
            cache[row] = _row_pairs(q_segs, k_segs, spec, row)
        pairs += [
            Pair(p.qa + b * lq, p.qb + b * lq, p.ka + b * lk, p.kb + b * lk, p.left, p.right) for p in cache[row]
        ]
    rounds: list[list[Pair]] = []
    for p in sorted(pairs, key=lambda p: (p.left, p.right, p.qa, p.ka)):
        for r in rounds:  # first fit: same window, and after the round's last pair on both sides
            last = r[-1]
            if (last.left, last.right) == (p.left, p.right) and p.qa >= last.qb and p.ka >= last.kb:
                r.append(p)
                break
        else:
            rounds.append([p])
    return tuple(_round(r) for r in rounds)


def plan_cache_info() -> dict[str, functools._CacheInfo]:
    """Hits and misses (plans built) of both plan caches, for tests and logs."""
    return {"block": block_plan.cache_info(), "varlen": varlen_plan.cache_info()}
