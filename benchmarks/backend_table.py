"""Re-measure backend='auto''s table (hf_seqpar/kernels/auto_table.py): every kernel backend on every (dtype, mask)
class, forward + backward of one rank's ring hops (simulated P=2) on this device; the fastest exact backends first.

Usage: python benchmarks/backend_table.py [--device cuda] [--seq 32768] [--write]
Writes benchmarks/results/backend_table_<device>.json; `--write` also rewrites auto_table.py's rows for this device.
Without CUDA it runs through the CPU stand-in at a small size (`make gpu-check` does): the plan is tested, the
times mean nothing and nothing is written to auto_table.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

from hf_seqpar.algorithms.ring import AttnArgs  # noqa: E402
from hf_seqpar.algorithms.simulate import simulate  # noqa: E402
from hf_seqpar.config import KERNEL_BACKENDS  # noqa: E402
from hf_seqpar.kernels import MaskSpec, registry, standin  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TABLE = Path(__file__).resolve().parents[1] / "hf_seqpar" / "kernels" / "auto_table.py"


def masks(seq: int) -> dict[str, MaskSpec]:
    step = max(seq // 64, 2)  # documents of mean ~seq/64 tokens
    return {
        "dense": MaskSpec(causal=True),
        "window": MaskSpec(causal=True, window=seq // 8),
        "packed": MaskSpec(causal=True, docs=(tuple(range(0, seq, step)) + (seq,),)),
    }


def measure(opts) -> list[dict]:
    device = torch.device(opts.device)
    rows = []
    for dtype_name in opts.dtypes:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, opts.seq, opts.heads, opts.head_dim, device=device, generator=gen).to(dtype)
        k, v = (torch.randn(1, opts.seq, opts.kv_heads, opts.head_dim, device=device, generator=gen).to(dtype)
                for _ in range(2))  # fmt: skip
        dout = torch.randn_like(q)
        for mask, spec in masks(opts.seq).items():
            timings = {}
            for name in KERNEL_BACKENDS:
                if not registry.module(name).available():
                    continue
                args = AttnArgs(spec=spec, scale=opts.head_dim**-0.5, softcap=None, backend=name)
                runs = [simulate(q, k, v, mode="ring", world=2, args=args, dout=dout) for _ in range(1 + opts.iters)]
                timings[name] = sorted(max(f + b for f, b in zip(r["fwd_seconds"], r["bwd_seconds"], strict=True))
                                       for r in runs[1:])[opts.iters // 2]  # fmt: skip
            order = sorted(timings, key=timings.get)
            row = {"device": device.type, "dtype": registry.classes(q, spec)[1], "mask": mask, "order": order}
            rows.append({**row, "seconds": timings})
            print(f"{dtype_name:<9} {mask:<7} " + "  ".join(f"{n} {timings[n] * 1e3:.2f} ms" for n in order))
    return rows


def write_table(rows: list[dict], path: Path, source: str) -> None:
    """Rewrite the AUTO rows of auto_table.py for the measured (device, dtype, mask) classes; keep the others."""
    text = path.read_text()
    head, rest = text.split("AUTO = {\n", 1)
    body, tail = rest.split("\n}\n", 1)
    kept = [line for line in body.splitlines() if not any(f'("{r["device"]}", "{r["dtype"]}", "{r["mask"]}")' in line
                                                          for r in rows)]  # fmt: skip
    new = [f"    # measured: {source}"] + [
        f'    ("{r["device"]}", "{r["dtype"]}", "{r["mask"]}"): {tuple(r["order"])!r},' for r in rows
    ]
    path.write_text(head + "AUTO = {\n" + "\n".join(kept + new) + "\n}\n" + tail)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["bfloat16"])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="rewrite hf_seqpar/kernels/auto_table.py's rows")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args(argv)
    cuda = torch.device(opts.device).type == "cuda"
    if not cuda:  # the plan through the stand-in, small: heads 4 / 2 of 16
        opts.seq, opts.heads, opts.kv_heads, opts.head_dim, opts.iters = opts.seq or 256, 4, 2, 16, 1
    opts.seq = opts.seq or 32768
    with standin.cuda_standin(enabled=not cuda):
        rows = measure(opts)
    report = {"machine": machine_name(torch.device(opts.device)), "torch": torch.__version__, "rows": rows}
    out = opts.out or RESULTS / f"backend_table_{'cuda' if cuda else 'cpu_standin'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if opts.write and cuda:
        write_table(rows, TABLE, f"{report['machine']}, torch {torch.__version__}, {opts.seq} tokens")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
