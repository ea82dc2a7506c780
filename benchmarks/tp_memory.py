"""Benchmark: peak memory per rank of one training step under TP x SP (tp_size 1, 2, 4 on the same 4 ranks), measured
on CPU / gloo, against `hf-seqpar estimate`'s terms (`estimate_memory(..., tp=...)`).

Each rank builds memory.py's small Llama (hidden 256, 4 layers, 8 / 4 heads, float32, full fine-tuning) with a
512-token vocabulary, so that the layers' activations, not the logits, set the peak; shards one random sequence
with SequenceShardingCollator (ring attention over sp = 4 / tp) and runs one forward + backward. Measured: the peak
of live tensor bytes above what was live before the step (memory.LiveTensorBytes, the CPU counterpart of
`torch.cuda.max_memory_allocated`). What tensor parallelism changes: between blocks a rank holds seq / 4 tokens
whatever tp is, while each block's linears keep its all-gathered input, seq / sp tokens.

Usage: python benchmarks/tp_memory.py [--seq 4096] [--tps 1,2,4]
Writes benchmarks/results/tp_memory_cpu.json and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402
from machine import write_gloo_report  # noqa: E402

from hf_seqpar.estimate import ModelShape, estimate_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 4
SHAPE = {**memory.MODELS["small"], "vocab_size": 512}
CONFIGS = ("plain", "ckpt")  # memory.CONFIGS' names: without and with gradient checkpointing


def _worker(rank, store, tp, seq, config, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    import transformers

    import hf_seqpar

    ckpt, savings = memory.CONFIGS[config]
    cfg = hf_seqpar.SeqParConfig(sp_size=WORLD // tp, tp_size=tp, mode="ring", **savings)
    torch.manual_seed(0)
    model_config = transformers.LlamaConfig(**SHAPE, max_position_embeddings=max(seq, 8192))
    model = transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa").float().train()
    if ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    groups = hf_seqpar.init_groups(cfg)
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)
    batch = hf_seqpar.SequenceShardingCollator(lambda _: {"input_ids": ids, "labels": ids}, config=cfg, groups=groups)
    batch = batch([None])
    with memory.LiveTensorBytes() as live:
        model(**batch, num_items_in_batch=torch.tensor(seq - 1)).loss.backward()
    peaks = [None] * WORLD
    dist.all_gather_object(peaks, live.peak)
    if rank == 0:
        queue.put(peaks)
    dist.destroy_process_group()


def estimate(tp: int, seq: int, config: str) -> int:
    ckpt, _ = memory.CONFIGS[config]
    shape = ModelShape.from_config({**SHAPE, "tie_word_embeddings": False})
    return estimate_memory(shape, seq, WORLD, mode="ring", dtype="float32", grad_ckpt=ckpt, tp=tp)["step_peak_plain"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--tps", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=RESULTS / "tp_memory_cpu.json")
    opts = parser.parse_args(argv)
    ctx, rows = mp.get_context("spawn"), []
    for tp in opts.tps:
        for config in CONFIGS:
            queue = ctx.Queue()
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_worker, args=(os.path.join(tmp, "store"), tp, opts.seq, config, queue), nprocs=WORLD)
            peaks, est = queue.get(), estimate(tp, opts.seq, config)
            row = {"tp": tp, "sp": WORLD // tp, "seq": opts.seq, "config": config, "peak_bytes": peaks,
                   "estimate_bytes": est, "ratio": est / max(peaks)}  # fmt: skip
            rows.append(row)
            print(f"TP {tp} x SP {WORLD // tp} {config:<6} measured {max(peaks) / 2**20:7.1f} MiB (ranks "
                  f"{min(peaks) / 2**20:.1f}-{max(peaks) / 2**20:.1f})  estimate {est / 2**20:7.1f} MiB  "
                  f"estimate / measured {row['ratio']:.3f}", flush=True)  # fmt: skip
    report = write_gloo_report(opts, rows, shape=SHAPE)
    print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
