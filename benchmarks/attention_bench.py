"""Benchmark: time and bytes sent per rank for one attention forward+backward, every mode, on this machine.

Runs `world` gloo (CPU) or nccl (CUDA) ranks on one machine, causal GQA attention, and writes
benchmarks/results/attention_<device>.json plus a table. Bytes are counted by wrapping torch.distributed calls.
Usage: python benchmarks/attention_bench.py [--world 2] [--seq 4096] [--device cpu|cuda] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hf_seqpar

MODES = ("ring", "allgather", "ulysses")
_COUNTED = {  # name -> bytes this rank sends, from (args, group size)
    "batch_isend_irecv": lambda a, n: sum(
        op.tensor.numel() * op.tensor.element_size() for op in a[0] if op.op is dist.isend
    ),
    "all_to_all_single": lambda a, n: a[1].numel() * a[1].element_size() * (n - 1) // n,
    "all_gather_single": lambda a, n: a[1].numel() * a[1].element_size() * (n - 1),
    "all_gather_into_tensor": lambda a, n: a[1].numel() * a[1].element_size() * (n - 1),
    "reduce_scatter_single": lambda a, n: a[1].numel() * a[1].element_size() * (n - 1) // n,
    "reduce_scatter_tensor": lambda a, n: a[1].numel() * a[1].element_size() * (n - 1) // n,
}


def _count_bytes(counter: list[int]) -> None:
    for name, size in _COUNTED.items():
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*args, _orig=original, _size=size, **kwargs):
            group = kwargs.get("group") or (args[0][0].group if args and isinstance(args[0], list) else None)
            counter[0] += _size(args, dist.get_world_size(group))
            return _orig(*args, **kwargs)

        setattr(dist, name, wrapped)


def _worker(rank, world, store, opts, queue):
    backend = "nccl" if opts.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if opts.device == "cuda" else torch.device("cpu")
    if opts.device == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, opts.dtype)
    sent = [0]
    _count_bytes(sent)
    results = []
    for mode in MODES:
        cfg = hf_seqpar.SeqParConfig(sp_size=world, mode=mode)
        groups = hf_seqpar.init_groups(cfg)
        local = opts.seq // world
        q = torch.randn(1, local, opts.heads, opts.head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, local, opts.kv_heads, opts.head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        times = []
        for it in range(opts.warmup + opts.iters):
            dist.barrier()
            sent[0] = 0
            start = time.perf_counter()
            out = hf_seqpar.sequence_parallel_attention(q, k, v, config=cfg, groups=groups)
            fwd_bytes = sent[0]
            torch.autograd.grad(out.sum(), (q, k, v))
            if opts.device == "cuda":
                torch.cuda.synchronize()
            if it >= opts.warmup:
                times.append(time.perf_counter() - start)
        results.append(
            {
                "mode": mode,
                "seconds_median": sorted(times)[len(times) // 2],
                "fwd_bytes_sent": fwd_bytes,
                "fwd_bwd_bytes_sent": sent[0],
            }
        )
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    opts = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(opts.world, os.path.join(tmp, "store"), opts, queue), nprocs=opts.world)
    results = queue.get()
    machine = torch.cuda.get_device_name(0) if opts.device == "cuda" else f"{_cpu_name()} x{os.cpu_count()} cores"
    report = {"machine": machine, "torch": torch.__version__, "settings": vars(opts), "results": results}
    out = os.path.join(os.path.dirname(__file__), "results", f"attention_{opts.device}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"{machine}, world {opts.world}, seq {opts.seq}, heads {opts.heads}/{opts.kv_heads}, d {opts.head_dim}, "
        f"{opts.dtype}, causal"
    )
    print(f"{'mode':<10} {'fwd+bwd s':>10} {'fwd MiB sent/rank':>18} {'fwd+bwd MiB sent/rank':>22}")
    for r in results:
        print(
            f"{r['mode']:<10} {r['seconds_median']:>10.3f} {r['fwd_bytes_sent'] / 2**20:>18.2f} "
            f"{r['fwd_bwd_bytes_sent'] / 2**20:>22.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
