"""The P ranks of one sequence-parallel group simulated on one device, for benchmarks and single-GPU tests.

Ranks run one after another in lockstep: every rank's part of a step, then the next step. A ring hop, an all-gather,
a reduce-scatter or an all-to-all becomes device copies (what the receiving rank would hold). The ring runs the real
`ring_forward_steps` / `ring_backward_steps`; all-gather and Ulysses use the same kernels and layout calls as their
distributed versions. Each rank's time is measured on its own (`RankClock`, a device sync around each of its
pieces), so that per-rank efficiency = single-device kernel time / (P x slowest rank) can be computed. Results are
exact, so the simulation is tested against plain attention like the real thing.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..kernels import attend_bwd, attend_fwd
from ..layout import Placement, shard, unshard
from .ring import AttnArgs, ring_backward_steps, ring_forward_steps
from .ulysses import kv_heads_for_split


class RankClock:
    """Seconds spent by each rank; on CUDA the device is synchronized around every timed piece."""

    def __init__(self, world: int, device: torch.device, timed: bool = True):
        self.seconds = [0.0] * world
        cuda = torch.device(device).type == "cuda"
        self._sync = torch.cuda.synchronize if cuda and timed else (lambda: None)

    @contextlib.contextmanager
    def rank(self, r: int):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[r] += time.perf_counter() - start


class SimulatedExchange:
    """RingExchange between simulated ranks: start() copies the tensors into the next rank's mailbox."""

    def __init__(self, boxes: list[list], rank: int, world: int):
        self.boxes, self.rank, self.world = boxes, rank, world

    def start(self, tensors) -> None:
        self.boxes[(self.rank + 1) % self.world].append([t.clone() for t in tensors])

    def wait(self):
        return self.boxes[self.rank].pop(0)


def _lockstep(steps: list, clock: RankClock, ranks: list[int]) -> list:
    """Advance every rank's step generator one step at a time, rank after rank; return their values."""
    results, alive = [None] * len(steps), list(range(len(steps)))
    while alive:
        for i in list(alive):
            with clock.rank(ranks[i]):
                try:
                    next(steps[i])
                except StopIteration as done:
                    results[i] = done.value
                    alive.remove(i)
    return results


def _heads(x: torch.Tensor, j: int, u: int) -> torch.Tensor:
    per = x.shape[2] // u
    return x[:, :, j * per : (j + 1) * per]


class _Split:
    """Ulysses groups of u consecutive ranks, rings over the groups (u = 1: plain ring, u = P: plain Ulysses)."""

    def __init__(self, placement: Placement, u: int):
        self.placement, self.u, self.world = placement, u, placement.world
        self.gathers = [placement.group_gather(tuple(range(g * u, (g + 1) * u))) for g in range(self.world // u)]
        self.outer = placement.outer(u) if u > 1 else placement

    def to_heads(self, shards, r, dtype=None):
        """Rank r's all-to-all result: its group's tokens (position order) of its 1/u of the heads."""
        if self.u == 1:
            return shards[r]
        g, j = divmod(r, self.u)
        parts = [_heads(shards[g * self.u + i], j, self.u) for i in range(self.u)]
        return self.gathers[g].to_positions(torch.cat(parts, dim=1), 1)

    def to_seq(self, heads, r):
        """Rank r's all-to-all back: its own tokens of every head."""
        if self.u == 1:
            return heads[r]
        g, i = divmod(r, self.u)
        c = heads[r].shape[1] // self.u
        parts = [self.gathers[g].to_buffer(heads[g * self.u + j], 1)[:, i * c : (i + 1) * c] for j in range(self.u)]
        return torch.cat(parts, dim=2)

    def ring_of(self, r):
        """(index in its ring, ring size, ring id) of rank r."""
        return r // self.u, self.world // self.u, r % self.u


def _ring_modes(q, k, v, dout, placement: Placement, u: int, args: AttnArgs, clock_fwd, clock_bwd):
    world, heads_q, heads_kv = placement.world, q.shape[2], k.shape[2]
    split = _Split(placement, u)
    q_s, k_s, v_s = ([shard(t, placement, r, 1) for r in range(world)] for t in (q, k, v))
    k_h, v_h, q_h = [None] * world, [None] * world, [None] * world
    for r in range(world):
        with clock_fwd.rank(r):
            k_s[r], v_s[r] = kv_heads_for_split(k_s[r], heads_q, u), kv_heads_for_split(v_s[r], heads_q, u)
    for r in range(world):
        with clock_fwd.rank(r):
            q_h[r], k_h[r], v_h[r] = (split.to_heads(x, r) for x in (q_s, k_s, v_s))
    boxes = {j: [[] for _ in range(world // u)] for j in range(u)}
    steps = []
    for r in range(world):
        idx, size, ring = split.ring_of(r)
        exchange = SimulatedExchange(boxes[ring], idx, size)
        steps.append(ring_forward_steps(q_h[r], k_h[r], v_h[r], idx, size, exchange, split.outer, args))
    results = _lockstep(steps, clock_fwd, list(range(world)))
    out_h = [None] * world
    for r in range(world):
        with clock_fwd.rank(r):
            out_h[r] = results[r][0].to(q.dtype)
    out_s = [None] * world
    for r in range(world):
        with clock_fwd.rank(r):
            out_s[r] = split.to_seq(out_h, r)
    result = {"out": unshard(out_s, placement, 1)}
    if dout is None:
        return result
    d_s = [shard(dout, placement, r, 1) for r in range(world)]
    d_h = [None] * world
    for r in range(world):
        with clock_bwd.rank(r):
            d_h[r] = split.to_heads(d_s, r)
    boxes = {(j, c): [[] for _ in range(world // u)] for j in range(u) for c in ("kv", "dkv")}
    steps = []
    for r in range(world):
        idx, size, ring = split.ring_of(r)
        kv_x, dkv_x = (SimulatedExchange(boxes[(ring, c)], idx, size) for c in ("kv", "dkv"))
        lse = results[r][1]
        steps.append(
            ring_backward_steps(
                d_h[r], q_h[r], k_h[r], v_h[r], out_h[r], lse, idx, size, kv_x, dkv_x, split.outer, args
            )
        )
    grads_h = _lockstep(steps, clock_bwd, list(range(world)))
    grads_h = [tuple(g.to(q.dtype) for g in grads) for grads in grads_h]
    grads_s = [None] * world
    for r in range(world):
        with clock_bwd.rank(r):
            dq, dk, dv = (split.to_seq([g[i] for g in grads_h], r) for i in range(3))
            rep = dk.shape[2] // heads_kv  # K/V heads replicated for the split: their gradients add up
            if rep > 1:
                dk, dv = (x.unflatten(2, (heads_kv, rep)).sum(3) for x in (dk, dv))
            grads_s[r] = (dq, dk, dv)
    result["grads"] = tuple(unshard([g[i] for g in grads_s], placement, 1) for i in range(3))
    return result


def _allgather(q, k, v, dout, placement: Placement, args: AttnArgs, clock_fwd, clock_bwd):
    world = placement.world
    order = placement.group_gather(tuple(range(world)))
    q_s, k_s, v_s = ([shard(t, placement, r, 1) for r in range(world)] for t in (q, k, v))
    out_s, lse_s = [None] * world, [None] * world
    for r in range(world):
        with clock_fwd.rank(r):
            k_all, v_all = (order.to_positions(torch.cat(x, dim=1), 1) for x in (k_s, v_s))
            out, lse_s[r] = attend_fwd(
                q_s[r], k_all, v_all, placement.ranks[r], order.segments, args.spec, **args.kernel_kwargs()
            )
            out_s[r] = out.to(q.dtype)
    result = {"out": unshard(out_s, placement, 1)}
    if dout is None:
        return result
    d_s = [shard(dout, placement, r, 1) for r in range(world)]
    dq_s, dk_buf, dv_buf = [None] * world, [None] * world, [None] * world
    for r in range(world):
        with clock_bwd.rank(r):
            k_all, v_all = (order.to_positions(torch.cat(x, dim=1), 1) for x in (k_s, v_s))
            dq, dk_all, dv_all = attend_bwd(
                d_s[r], q_s[r], k_all, v_all, out_s[r], lse_s[r], placement.ranks[r], order.segments, args.spec,
                **args.kernel_kwargs(),
            )  # fmt: skip
            dq_s[r], dk_buf[r], dv_buf[r] = dq.to(q.dtype), order.to_buffer(dk_all, 1), order.to_buffer(dv_all, 1)
    c = q_s[0].shape[1]
    dk_s, dv_s = [None] * world, [None] * world
    for r in range(world):  # reduce-scatter: rank r sums every rank's partial of its shard
        with clock_bwd.rank(r):
            dk_s[r], dv_s[r] = (
                sum(b[i][:, r * c : (r + 1) * c] for i in range(world)).to(q.dtype) for b in (dk_buf, dv_buf)
            )
    result["grads"] = tuple(unshard(x, placement, 1) for x in (dq_s, dk_s, dv_s))
    return result


def simulate(
    q, k, v, *, mode: str, world: int, args: AttnArgs, layout: str = "zigzag", ulysses: int = 1, dout=None, timed=True
):
    """Full q [B, S, H, D], k/v [B, S, Hkv, D] -> {"out", "grads" (with dout), "fwd_seconds", "bwd_seconds"}, the
    seconds per rank. mode: ring | allgather | ulysses | usp (`ulysses` = the Ulysses degree of usp). `timed=False`:
    no device syncs (the seconds then only count host time)."""
    placement = Placement.build(q.shape[1], world, layout)
    clock_fwd, clock_bwd = RankClock(world, q.device, timed), RankClock(world, q.device, timed)
    if mode == "allgather":
        result = _allgather(q, k, v, dout, placement, args, clock_fwd, clock_bwd)
    else:
        u = {"ring": 1, "ulysses": world, "usp": ulysses}[mode]
        if world % u or q.shape[2] % u:
            raise ValueError(f"hf_seqpar: ulysses degree {u} must divide {world} ranks and {q.shape[2]} heads")
        result = _ring_modes(q, k, v, dout, placement, u, args, clock_fwd, clock_bwd)
    result.update(fwd_seconds=clock_fwd.seconds, bwd_seconds=clock_bwd.seconds)
    return result
