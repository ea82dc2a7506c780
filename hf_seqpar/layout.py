"""Pure index math: which global token positions live on which rank. The only place that knows.

A rank's shard is a concatenation of `Segment`s (contiguous runs of global positions):
- contiguous: rank r holds `[r*S/P, (r+1)*S/P)`;
- zigzag: the sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r (equal causal work per rank).

The same placement serves every mode. Ulysses gathers the shards of its group and sorts the pieces back into
position order (`GroupGather`), so for zigzag over P ranks a Ulysses group of u consecutive ranks ends up with
two contiguous runs, which is exactly the zigzag placement over P/u ring ranks: USP needs no layout of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch


class Segment(NamedTuple):
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def required_multiple(world: int, layout: str) -> int:
    """The sequence length must be a multiple of this for `layout` over `world` ranks."""
    if layout == "zigzag":
        return 2 * world
    if layout == "contiguous":
        return world
    raise ValueError(f"hf_seqpar: unknown layout {layout!r}; expected 'zigzag' or 'contiguous'")


def check_length(seq_len: int, world: int, layout: str) -> None:
    multiple = required_multiple(world, layout)
    if seq_len % multiple != 0 or seq_len == 0:
        padded = max(multiple, -(-seq_len // multiple) * multiple)
        raise ValueError(
            f"hf_seqpar: sequence length {seq_len} must be a positive multiple of {multiple} for "
            f"layout={layout!r} over "
            f"{world} ranks; pad it (SequenceShardingCollator does) to {padded}"
        )


@dataclass(frozen=True)
class Placement:
    """Segments held by each rank of one group, in the order they are stored in that rank's tensor."""

    seq_len: int
    ranks: tuple[tuple[Segment, ...], ...]

    @classmethod
    @functools.cache  # called once per attention call (every layer): the tuples are the same every time
    def build(cls, seq_len: int, world: int, layout: str) -> Placement:
        check_length(seq_len, world, layout)
        if layout == "contiguous":
            c = seq_len // world
            return cls(seq_len, tuple((Segment(r * c, c),) for r in range(world)))
        c = seq_len // (2 * world)
        return cls(seq_len, tuple((Segment(r * c, c), Segment((2 * world - 1 - r) * c, c)) for r in range(world)))

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def local_len(self) -> int:
        return sum(s.length for s in self.ranks[0])

    def positions(self, rank: int) -> torch.Tensor:
        """Global positions of `rank`'s tokens, in storage order (int64)."""
        return torch.cat([torch.arange(s.start, s.end) for s in self.ranks[rank]])

    def group_gather(self, members: tuple[int, ...]) -> GroupGather:
        """How to turn the concatenated shards of `members` (in that order) into position-ordered runs."""
        pieces = []  # (start, length, offset in the concatenated buffer)
        offset = 0
        for rank in members:
            for seg in self.ranks[rank]:
                pieces.append((seg.start, seg.length, offset))
                offset += seg.length
        pieces.sort()
        merged: list[Segment] = []
        for start, length, _ in pieces:
            if merged and merged[-1].end == start:
                merged[-1] = Segment(merged[-1].start, merged[-1].length + length)
            else:
                merged.append(Segment(start, length))
        order = tuple(Segment(off, length) for _, length, off in pieces)
        return GroupGather(order=order, segments=tuple(merged))

    def outer(self, inner: int) -> Placement:
        """Placement over groups of `inner` consecutive ranks (USP ring level): group g holds its members' runs."""
        if self.world % inner != 0:
            raise ValueError(f"hf_seqpar: inner group size {inner} must divide the group size {self.world}")
        groups = range(self.world // inner)
        return Placement(
            self.seq_len, tuple(self.group_gather(tuple(range(g * inner, (g + 1) * inner))).segments for g in groups)
        )


@dataclass(frozen=True)
class GroupGather:
    """`order`: (offset, length) pieces of the concatenated buffer, listed in position order.
    `segments`: the position runs those pieces form once reordered."""

    order: tuple[Segment, ...]
    segments: tuple[Segment, ...]

    @property
    def is_identity(self) -> bool:
        return all(a.end == b.start for a, b in zip(self.order, self.order[1:], strict=False)) and (
            not self.order or self.order[0].start == 0
        )

    def to_positions(self, buffer: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenated-shard order -> position order (one copy, none when already in order)."""
        if self.is_identity:
            return buffer
        return torch.cat([buffer.narrow(dim, p.start, p.length) for p in self.order], dim=dim)

    def to_buffer(self, ordered: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of `to_positions`: position order -> concatenated-shard order."""
        if self.is_identity:
            return ordered
        starts, pos = [], 0  # where each piece sits in the position-ordered tensor
        for piece in self.order:
            starts.append(pos)
            pos += piece.length
        by_offset = sorted(range(len(self.order)), key=lambda i: self.order[i].start)
        return torch.cat([ordered.narrow(dim, starts[i], self.order[i].length) for i in by_offset], dim=dim)


def shard(x: torch.Tensor, placement: Placement, rank: int, dim: int) -> torch.Tensor:
    """Full sequence -> `rank`'s shard, contiguous (HF code calls .view on batch tensors)."""
    if x.shape[dim] != placement.seq_len:
        raise ValueError(
            f"hf_seqpar: tensor has length {x.shape[dim]} along dim {dim}; the placement is for {placement.seq_len}"
        )
    runs = [x.narrow(dim, s.start, s.length) for s in placement.ranks[rank]]
    return runs[0].contiguous() if len(runs) == 1 else torch.cat(runs, dim=dim)


def unshard(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], placement: Placement, dim: int) -> torch.Tensor:
    """Every rank's shard (in rank order) -> the full sequence."""
    gather = placement.group_gather(tuple(range(placement.world)))
    return gather.to_positions(torch.cat(list(shards), dim=dim), dim)
