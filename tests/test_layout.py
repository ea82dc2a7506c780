"""layout.py: which global position lives on which rank. Pure index math, so every comparison is exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_seqpar.kernels import BlockKind, MaskSpec
from hf_seqpar.kernels.plan import _pairs
from hf_seqpar.layout import Placement, shard, unshard

WORLDS = [1, 2, 3, 4, 8]
LAYOUTS = ["contiguous", "zigzag"]


def _expected_positions(seq_len: int, world: int, layout: str, rank: int) -> torch.Tensor:
    """The rule of DESIGN.md, written with torch.chunk instead of segments."""
    if layout == "contiguous":
        return torch.arange(seq_len).chunk(world)[rank]
    chunks = torch.arange(seq_len).chunk(2 * world)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])


@pytest.mark.parametrize("world,layout", list(itertools.product(WORLDS, LAYOUTS)))
def test_every_position_once_and_where_the_rule_says(world, layout):
    seq_len = 2 * world * 3
    placement = Placement.build(seq_len, world, layout)
    assert placement.world == world and placement.local_len == seq_len // world
    held = [placement.positions(r) for r in range(world)]
    assert sorted(torch.cat(held).tolist()) == list(range(seq_len))
    for rank in range(world):
        assert torch.equal(held[rank], _expected_positions(seq_len, world, layout, rank))


@pytest.mark.parametrize("world,layout,dim", list(itertools.product(WORLDS, LAYOUTS, [0, 1, 2])))
def test_shard_unshard_round_trip(world, layout, dim):
    seq_len = 4 * world
    shape = [3, 5, 2]
    shape[dim] = seq_len
    x = torch.randn(shape, generator=torch.Generator().manual_seed(world))
    placement = Placement.build(seq_len, world, layout)
    shards = [shard(x, placement, r, dim) for r in range(world)]
    for rank, local in enumerate(shards):
        assert torch.equal(local, x.index_select(dim, _expected_positions(seq_len, world, layout, rank)))
    assert torch.equal(unshard(shards, placement, dim), x)


@pytest.mark.parametrize(
    "world,layout,members",
    [(4, "zigzag", m) for m in [(0, 1, 2, 3), (0, 1), (2, 3), (3, 1), (2,)]]
    + [(3, "zigzag", (0, 1, 2)), (4, "contiguous", (0, 1, 2, 3)), (4, "contiguous", (3, 0))],
)
def test_group_gather_sorts_into_position_order(world, layout, members):
    seq_len = 8 * world
    x = torch.arange(seq_len * 2).reshape(2, seq_len) * 10  # dim 1 is the sequence
    placement = Placement.build(seq_len, world, layout)
    gather = placement.group_gather(members)
    buffer = torch.cat([shard(x, placement, r, 1) for r in members], dim=1)
    held = torch.sort(torch.cat([placement.positions(r) for r in members])).values
    ordered = gather.to_positions(buffer, 1)
    assert torch.equal(ordered, x[:, held])
    assert torch.equal(torch.cat([torch.arange(s.start, s.end) for s in gather.segments]), held)
    assert torch.equal(gather.to_buffer(ordered, 1), buffer)
    assert torch.equal(gather.to_positions(gather.to_buffer(x[:, held], 1), 1), x[:, held])


@pytest.mark.parametrize("world,inner", [(4, 2), (8, 2), (8, 4), (6, 3)])
def test_outer_of_zigzag_is_zigzag_over_fewer_ranks(world, inner):
    # what makes USP work: a Ulysses group of `inner` zigzag ranks holds a zigzag shard over world/inner ranks
    # (runs may merge differently: the middle group's two chunks touch, so compare the positions held)
    seq_len = 4 * world
    outer, ring = (
        Placement.build(seq_len, world, "zigzag").outer(inner),
        Placement.build(seq_len, world // inner, "zigzag"),
    )
    assert (outer.seq_len, outer.world) == (ring.seq_len, ring.world)
    for group in range(world // inner):
        assert torch.equal(outer.positions(group), ring.positions(group))


@pytest.mark.parametrize(
    "seq_len,world,layout,multiple",
    [
        (30, 4, "zigzag", 8),
        (6, 2, "zigzag", 4),
        (30, 4, "contiguous", 4),
        (7, 3, "zigzag", 6),
        (0, 2, "contiguous", 2),
    ],
)
def test_wrong_length_names_the_multiple(seq_len, world, layout, multiple):
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        Placement.build(seq_len, world, layout)


def test_shard_of_a_tensor_of_the_wrong_length_raises():
    with pytest.raises(ValueError, match="16"):
        shard(torch.zeros(2, 12), Placement.build(16, 2, "zigzag"), 0, 1)


def _visible_pairs_per_rank(world: int, layout: str, seq_len: int) -> list[int]:
    """Causal (query, key) pairs each rank computes in ring attention, summed over every source rank's shard."""
    placement, spec = Placement.build(seq_len, world, layout), MaskSpec(causal=True)
    work = []
    for rank in range(world):
        total = 0
        for source in range(world):
            for _, _, kind, qs, ks in _pairs(placement.ranks[rank], placement.ranks[source], spec):
                i, j = torch.arange(qs.start, qs.end)[:, None], torch.arange(ks.start, ks.end)[None, :]
                visible = int((j <= i).sum())
                if kind is BlockKind.FULL:
                    assert visible == qs.length * ks.length
                if kind is BlockKind.CAUSAL:
                    assert visible == qs.length * (qs.length + 1) // 2
                total += visible
        work.append(total)
    assert sum(work) == seq_len * (seq_len + 1) // 2  # every visible pair computed exactly once
    return work


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(world):
    seq_len = 2 * world * 5
    zigzag = _visible_pairs_per_rank(world, "zigzag", seq_len)
    assert zigzag == [seq_len * (seq_len + 1) // 2 // world] * world
    contiguous = _visible_pairs_per_rank(world, "contiguous", seq_len)
    assert contiguous == sorted(contiguous) and contiguous[0] < contiguous[-1]  # rank P-1 does the most
    assert max(contiguous) == contiguous[world - 1] > zigzag[0]
