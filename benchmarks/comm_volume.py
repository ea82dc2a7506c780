"""Benchmark: bytes each rank sends for one attention call (one layer), measured on gloo, against each mode's formula.

Every torch.distributed collective hf_seqpar calls is wrapped (hf_seqpar looks them up at call time) and what this
rank sends is added up: a P2P send counts its tensor, an all-gather (P-1) x its input, an all-to-all and a
reduce-scatter (P-1)/P of their input. The formulas (per rank, per layer; c local tokens, e bytes per element, a bytes
of the float32 accumulators, kv = 2 * B * c * Hkv' * D, Hkv' the K/V heads after Ulysses' replication):
  ring       forward (P-1) kv e;  backward (P-1) kv e (K/V again) + (P-1) kv a (dK/dV partial sums)
  allgather  forward (P-1) kv e;  backward (P-1) kv e (K/V re-gathered) + (P-1) kv a (reduce-scatter of dK/dV)
  ulysses    forward and backward (P-1)/P * B c D e (2H + 2Hkv')   (q, k, v, out / their gradients)
  usp        its Ulysses all-to-all over u plus the ring over P/u groups with H/u heads
ratio = measured / formula; 1.00 means no byte beyond the algorithm's own minimum (no padding, no extra hop).

Usage: python benchmarks/comm_volume.py [--worlds 2,4,8] [--seq 4096] [--dtype bfloat16]
Writes benchmarks/results/comm_volume.json and prints the table.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_gloo_report  # noqa: E402

import hf_seqpar  # noqa: E402
from hf_seqpar.estimate import comm_bytes_per_layer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHARES = {  # collective -> (kind, share of its input this rank sends, given the group size)
    "all_to_all_single": ("all_to_all", lambda n: Fraction(n - 1, n)),
    "all_gather_single": ("all_gather", lambda n: n - 1),
    "all_gather_into_tensor": ("all_gather", lambda n: n - 1),
    "reduce_scatter_single": ("reduce_scatter", lambda n: Fraction(n - 1, n)),
    "reduce_scatter_tensor": ("reduce_scatter", lambda n: Fraction(n - 1, n)),
    "all_reduce": ("all_reduce", lambda n: Fraction(2 * (n - 1), n)),  # ring: reduce-scatter, then all-gather
}


class SentBytes:
    """Context manager: count the bytes this rank sends through torch.distributed into `self.sent[kind]`, and into
    `self.by_group[labels[group]]` (None for a group `labels` does not name)."""

    def __init__(self, labels: dict | None = None):
        self.sent: dict[str, Fraction] = {}
        self.by_group: dict[str | None, Fraction] = {}
        self._labels = labels or {}
        self._saved = {}

    def _add(self, kind, nbytes, group=None):
        self.sent[kind] = self.sent.get(kind, 0) + nbytes
        label = self._labels.get(group)
        self.by_group[label] = self.by_group.get(label, 0) + nbytes

    def __enter__(self):
        for name, (kind, share) in SHARES.items():
            if not hasattr(dist, name):
                continue
            orig = self._saved[name] = getattr(dist, name)
            sig = inspect.signature(orig)

            def wrapper(*args, _orig=orig, _sig=sig, _kind=kind, _share=share, **kwargs):
                bound = _sig.bind(*args, **kwargs).arguments
                t, group = bound.get("input", bound.get("input_tensor", bound.get("tensor"))), bound.get("group")
                self._add(_kind, t.numel() * t.element_size() * _share(dist.get_world_size(group)), group)
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapper)
        orig_p2p = self._saved["batch_isend_irecv"] = dist.batch_isend_irecv

        def p2p(ops):
            for op in ops:
                if op.op is dist.isend:
                    self._add("p2p", op.tensor.numel() * op.tensor.element_size(), op.group)
            return orig_p2p(ops)

        dist.batch_isend_irecv = p2p
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    @property
    def total(self) -> int:
        return int(sum(self.sent.values()))


def formula(mode: str, world: int, b: int, c: int, h: int, hkv: int, d: int, e: int, a: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank must send per layer: the formulas `hf-seqpar estimate` uses."""
    fwd, bwd = comm_bytes_per_layer(mode, world, 2, b, c, h, hkv, d, e, a)
    return sum(fwd.values()), sum(bwd.values())


def measure(mode: str, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str) -> dict:
    """On every rank of an initialised group: one attention forward and backward; this rank's bytes sent."""
    world = dist.get_world_size()
    cfg = hf_seqpar.SeqParConfig(sp_size=world, mode=mode, **({"ulysses_size": 2} if mode == "usp" else {}))
    groups = hf_seqpar.init_groups(cfg)
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(dist.get_rank())
    c = seq // world
    q = torch.randn(1, c, heads, head_dim, generator=gen).to(dt).requires_grad_()
    k = torch.randn(1, c, kv_heads, head_dim, generator=gen).to(dt).requires_grad_()
    v = torch.randn(1, c, kv_heads, head_dim, generator=gen).to(dt).requires_grad_()
    with SentBytes() as fwd:
        out = hf_seqpar.sequence_parallel_attention(q, k, v, config=cfg, groups=groups)
    with SentBytes() as bwd:
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    acc = 8 if dt == torch.float64 else 4
    want_fwd, want_bwd = formula(mode, world, 1, c, heads, kv_heads, head_dim, q.element_size(), acc)
    return {
        "mode": mode,
        "world": world,
        "seq": seq,
        "fwd_bytes": fwd.total,
        "bwd_bytes": bwd.total,
        "fwd_formula": want_fwd,
        "bwd_formula": want_bwd,
        "fwd_ratio": fwd.total / want_fwd,
        "bwd_ratio": bwd.total / want_bwd,
        "by_collective": {
            "fwd": {k: int(v) for k, v in fwd.sent.items()},
            "bwd": {k: int(v) for k, v in bwd.sent.items()},
        },
    }


def _worker(rank, world, store, opts, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for mode in opts.modes:
        if mode == "usp" and world < 4:
            continue
        rows.append(measure(mode, opts.seq, opts.heads, opts.kv_heads, opts.head_dim, opts.dtype))
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:  # every rank's ratio: the table shows the worst
        queue.put(gathered)
    dist.destroy_process_group()


def plot(report: dict, path: Path) -> bool:
    """Bars: MiB each rank sends per layer (measured), forward and backward, per mode and P; dots: the formula."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["results"]
    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(4.2 * len(worlds), 3.6), sharey=True, squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        mine = [r for r in rows if r["world"] == world]
        x = range(len(mine))
        for offset, side, color in ((-0.2, "fwd", "tab:blue"), (0.2, "bwd", "tab:orange")):
            ax.bar([i + offset for i in x], [r[f"{side}_bytes"] / 2**20 for r in mine], 0.4, color=color,
                   label=f"{side} measured")  # fmt: skip
            ax.plot([i + offset for i in x], [r[f"{side}_formula"] / 2**20 for r in mine], "k_", markersize=14)
        ax.set_xticks(list(x), [r["mode"] for r in mine])
        ax.set_title(f"P={world} (black: formula)")
    axes[0][0].set_ylabel("MiB sent per rank per layer")
    axes[0][-1].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(
        f"{s['seq']} tokens, {s['heads']}/{s['kv_heads']} heads of {s['head_dim']}, {s['dtype']}, gloo", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["ring", "allgather", "ulysses", "usp"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS / "comm_volume.json")
    opts = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for world in opts.worlds:
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), opts, queue), nprocs=world)
        per_rank = queue.get()
        for i, row in enumerate(per_rank[0]):
            ratios = [(r[i]["fwd_ratio"], r[i]["bwd_ratio"]) for r in per_rank]
            row.update(
                fwd_ratio_range=[min(x for x, _ in ratios), max(x for x, _ in ratios)],
                bwd_ratio_range=[min(y for _, y in ratios), max(y for _, y in ratios)],
            )
            rows.append(row)
            print(
                f"P={world} {row['mode']:<9} fwd {row['fwd_bytes'] / 2**20:8.3f} MiB / formula "
                f"{row['fwd_formula'] / 2**20:8.3f} = {row['fwd_ratio']:.2f}   bwd {row['bwd_bytes'] / 2**20:8.3f} MiB"
                f" / {row['bwd_formula'] / 2**20:8.3f} = {row['bwd_ratio']:.2f}   (ranks: fwd "
                f"{row['fwd_ratio_range'][0]:.2f}-{row['fwd_ratio_range'][1]:.2f}, bwd "
                f"{row['bwd_ratio_range'][0]:.2f}-{row['bwd_ratio_range'][1]:.2f})",
                flush=True,
            )
    report = write_gloo_report(opts, rows)
    drew = plot(report, opts.out.with_suffix(".png"))
    print(f"wrote {opts.out}" + (f" and {opts.out.with_suffix('.png')}" if drew else ""))
    return report


if __name__ == "__main__":
    main()
