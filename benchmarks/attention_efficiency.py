"""Benchmark: per-rank efficiency of each sequence-parallel mode against the fastest kernel a user could pick.

P ranks are simulated on one device (hf_seqpar.algorithms.simulate): each rank's blocks run one after another, the
hops and collectives are device copies, and every rank's time is measured on its own. Then

    efficiency = reference time (the fastest of torch's SDPA backends on the full sequence, one device; for packed
                 rows torch's varlen_attn, or SDPA with a block-diagonal mask where that does not run)
                 / (P x the slowest rank's time)

for the forward and for forward + backward; 1.0 means splitting the work over P ranks cost nothing beyond the
communication itself (which this benchmark does not model: see comm_volume.py). `kernel_efficiency` is the same
ratio for hf_seqpar's own local attention on the whole sequence (sp_size=1). Causal attention, unpacked and packed
(random document lengths, mean --doc-mean tokens).

Usage: python benchmarks/attention_efficiency.py [--device cuda|cpu] [--quick] [--seqs 16384,65536] [--worlds 2,4,8]
Writes benchmarks/results/attention_efficiency_<device>.json (+ .png with matplotlib) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

from hf_seqpar.algorithms.ring import AttnArgs  # noqa: E402
from hf_seqpar.algorithms.simulate import RankClock, simulate  # noqa: E402
from hf_seqpar.kernels import MaskSpec, attend_bwd, attend_fwd, resolve_backend, varlen_impl  # noqa: E402
from hf_seqpar.kernels.plan import block_plan, varlen_plan  # noqa: E402
from hf_seqpar.layout import Placement, Segment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("ring", "allgather", "ulysses", "usp")


def _docs(seq: int, mean: int, seed: int) -> tuple[int, ...]:
    rng, offsets = random.Random(seed), [0]
    while offsets[-1] < seq:
        offsets.append(min(seq, offsets[-1] + rng.randint(1, 2 * mean - 1)))
    return tuple(offsets)


def _monolithic(q, k, v, dout, args: AttnArgs):
    """(forward seconds, backward seconds) of the local attention on the whole sequence."""
    clock = RankClock(2, q.device)
    whole = (Segment(0, q.shape[1]),)
    with clock.rank(0):
        out, lse = attend_fwd(q, k, v, whole, whole, args.spec, **args.kernel_kwargs())
        out = out.to(q.dtype)
    with clock.rank(1):
        attend_bwd(dout, q, k, v, out, lse, whole, whole, args.spec, **args.kernel_kwargs())
    return clock.seconds


def _timed(fn, q, k, v, dout):
    """(forward seconds, backward seconds) of fn(q, k, v) -> out [B, S, H, D] with autograd."""
    clock = RankClock(2, q.device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with clock.rank(0):
        out = fn(*leaves)
    with clock.rank(1):
        out.backward(dout)
    return clock.seconds


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def attention(q, k, v):
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True
            )
        return out.transpose(1, 2)

    return attention


def _masked_sdpa(docs):
    def attention(q, k, v):
        doc = torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
        for d, (a, b) in enumerate(zip(docs, docs[1:], strict=False)):
            doc[a:b] = d
        mask = (doc[:, None] == doc[None, :]).tril()
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, enable_gqa=True
        )
        return out.transpose(1, 2)

    return attention


def _varlen_attn(docs):
    from torch.nn.attention.varlen import varlen_attn

    def attention(q, k, v):
        cu = torch.tensor(docs, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(docs, docs[1:], strict=False))
        out = varlen_attn(q[0], k[0], v[0], cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True)
        return out[None]

    return attention


def _references(q, docs) -> dict:
    """What a user could run instead on the whole sequence, by name."""
    from torch.nn.attention import SDPBackend

    if docs is None:
        names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if q.is_cuda else ("FLASH_ATTENTION",)
        return {f"sdpa_{n.lower()}": _sdpa(getattr(SDPBackend, n)) for n in names}
    refs = {"sdpa_block_diagonal_mask": _masked_sdpa(docs)} if q.shape[1] <= 16384 else {}
    if q.is_cuda:
        refs["torch_varlen_attn"] = _varlen_attn(docs)
    return refs


def _best_reference(q, k, v, dout, docs, repeats: int):
    """(name, forward seconds, forward + backward seconds) of the fastest reference that runs here."""
    best = None
    for name, fn in _references(q, docs).items():
        try:
            times = [_timed(fn, q, k, v, dout) for _ in range(repeats)]
        except (RuntimeError, TypeError, ValueError) as err:  # a backend this machine or version lacks
            print(f"  reference {name} skipped: {str(err).splitlines()[0][:100]}", flush=True)
            continue
        fwd, total = _median([t[0] for t in times[1:] or times]), _median([sum(t) for t in times[1:] or times])
        if best is None or total < best[2]:
            best = (name, fwd, total)
    return best


def _plan_seconds(seq: int, world: int, spec: MaskSpec, batch: int, varlen: bool) -> float:
    """Host time to build every plan of one ring step for one rank (cold caches), as the first layer of a step
    does; all later layers, hops and the backward reuse them."""
    placement = Placement.build(seq, world, "zigzag")
    build = varlen_plan if varlen else block_plan
    build.cache_clear()
    start = time.perf_counter()
    for source in range(world):
        if varlen:
            build(placement.ranks[0], placement.ranks[source], spec, batch)
        else:
            build(placement.ranks[0], placement.ranks[source], spec)
    return time.perf_counter() - start


def _median(values):
    return sorted(values)[len(values) // 2]


def run(opts, out: Path | None = None) -> dict:
    """Every row; with `out`, the report so far is written there after each row (a run stopped early keeps them)."""
    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype)
    rows = []
    report = {
        "machine": machine_name(device),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "backend": resolve_backend(opts.backend, torch.empty(1, device=device, dtype=dtype)),
        "results": rows,
    }
    for seq in opts.seqs:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (1, seq)
        q = torch.randn(*shape, opts.heads, opts.head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(*shape, opts.kv_heads, opts.head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(*shape, opts.kv_heads, opts.head_dim, device=device, dtype=dtype, generator=gen)
        dout = torch.randn_like(q)
        for packing in ("unpacked", "packed"):
            docs = (_docs(seq, opts.doc_mean, seed=seq),) if packing == "packed" else None
            spec = MaskSpec(causal=True, docs=docs)
            backend = resolve_backend(opts.backend, q)
            args = AttnArgs(spec=spec, scale=opts.head_dim**-0.5, softcap=None, backend=backend)
            mono = [_monolithic(q, k, v, dout, args) for _ in range(opts.warmup + opts.iters)][opts.warmup :]
            mono_fwd, mono_total = _median([m[0] for m in mono]), _median([m[0] + m[1] for m in mono])
            ref_name, ref_fwd, ref_total = _best_reference(q, k, v, dout, docs and docs[0], 1 + opts.iters) or (
                "hf_seqpar_sp1",
                mono_fwd,
                mono_total,  # nothing else runs here (recorded as such)
            )
            for world in opts.worlds:
                for mode in opts.modes:
                    if mode == "usp" and world < 4:
                        continue  # usp = ulysses 2 x ring P/2, only distinct from both for P >= 4
                    if mode in ("ulysses", "usp") and opts.heads % (world if mode == "ulysses" else 2):
                        continue
                    slow_fwd, slow_total = [], []
                    for it in range(opts.warmup + opts.iters):
                        got = simulate(q, k, v, mode=mode, world=world, args=args, ulysses=2, dout=dout)
                        if it >= opts.warmup:
                            slow_fwd.append(max(got["fwd_seconds"]))
                            slow_total.append(
                                max(f + b for f, b in zip(got["fwd_seconds"], got["bwd_seconds"], strict=True))
                            )
                        del got
                    fwd, total = _median(slow_fwd), _median(slow_total)
                    rows.append(
                        {
                            "seq": seq,
                            "packing": packing,
                            "documents": None if docs is None else len(docs[0]) - 1,
                            "world": world,
                            "mode": mode,
                            "reference": ref_name,
                            "reference_fwd_s": ref_fwd,
                            "reference_fwd_bwd_s": ref_total,
                            "monolithic_fwd_s": mono_fwd,
                            "monolithic_fwd_bwd_s": mono_total,
                            "kernel_efficiency": ref_total / mono_total,
                            "slowest_rank_fwd_s": fwd,
                            "slowest_rank_fwd_bwd_s": total,
                            "efficiency_fwd": ref_fwd / (world * fwd),
                            "efficiency_fwd_bwd": ref_total / (world * total),
                            "plan_build_s": _plan_seconds(
                                seq, world, spec, 1, varlen_impl(backend, q, v, None, spec) is not None
                            ),
                        }
                    )
                    print(_line(rows[-1]), flush=True)
                    if out is not None:
                        out.write_text(json.dumps(report, indent=2) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def _line(r: dict) -> str:
    return (
        f"{r['seq']:>7} {r['packing']:<8} P={r['world']} {r['mode']:<9} "
        f"fwd {r['efficiency_fwd']:.3f}  fwd+bwd {r['efficiency_fwd_bwd']:.3f}  "
        f"({r['reference']} {r['reference_fwd_bwd_s'] * 1e3:.1f} ms, hf_seqpar sp=1 {r['kernel_efficiency']:.3f}, "
        f"slowest rank {r['slowest_rank_fwd_bwd_s'] * 1e3:.1f} ms)"
    )


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["results"]
    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(2, len(worlds), figsize=(4.5 * len(worlds), 7), sharey=True, squeeze=False)
    for col, world in enumerate(worlds):
        for row_i, packing in enumerate(("unpacked", "packed")):
            ax = axes[row_i][col]
            for mode in MODES:
                pts = [r for r in rows if r["world"] == world and r["packing"] == packing and r["mode"] == mode]
                if pts:
                    ax.plot([r["seq"] for r in pts], [r["efficiency_fwd_bwd"] for r in pts], marker="o", label=mode)
            ax.axhline(0.92, color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_title(f"P={world}, causal {packing}")
            ax.set_xlabel("tokens")
            if col == 0:
                ax.set_ylabel("efficiency, fwd+bwd")
            ax.legend(fontsize=8)
    fig.suptitle(f"Per-rank efficiency vs the fastest torch kernel, whole sequence ({report['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU test runs this)")
    parser.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--doc-mean", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one: steadier on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/...<device>.json)")
    opts = parser.parse_args(argv)
    gpu = opts.device.startswith("cuda")
    # GPU: Llama-3-8B's attention (32 / 8 heads of 128), bf16, 16K-256K tokens; CPU: a small shape in float32
    defaults = {
        "seqs": [16384, 65536, 262144] if gpu else [4096],
        "heads": 32 if gpu else 8,
        "kv_heads": 8 if gpu else 2,
        "head_dim": 128 if gpu else 64,
        "doc_mean": 256 if gpu else 128,
        "dtype": "bfloat16" if gpu else "float32",
        "iters": 3 if gpu else 2,
    }
    if opts.quick:
        defaults.update(seqs=[16384] if gpu else [256], iters=1, doc_mean=64)
        opts.worlds = opts.worlds if gpu else [w for w in opts.worlds if w <= 4]
        opts.warmup = opts.warmup if gpu else 0
    for name, value in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    return opts


def main(argv=None) -> dict:
    opts = parse(argv)
    torch.manual_seed(0)
    if torch.device(opts.device).type == "cpu":
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device).type
    out = opts.out or RESULTS / f"attention_efficiency_{device}{'_quick' if opts.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(opts, out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    drew = plot(report, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if drew else ""))
    return report


if __name__ == "__main__":
    main()
