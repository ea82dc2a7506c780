"""Benchmark: bytes each rank sends in one training step (forward + backward) of a tiny Llama under TP x SP
(Megatron-SP regions composed with ring / Ulysses / all-gather attention), measured on gloo, against the formulas.

Every torch.distributed collective is wrapped (comm_volume.SentBytes) and what this rank sends is added up per
process group: the tensor-parallel group's all-gathers and reduce-scatters, and the sequence-parallel attention's
collectives on the SP group. The formulas (per rank; T = tp_size, X = B * S_sp * hidden * e the bytes of one block's
gathered input, S_sp the tokens of an SP shard, e the activation's bytes):
  TP, per layer   forward 2 all-gathers + 2 reduce-scatters (attention and MLP blocks), (T-1)/T * X each;
                  backward the same four (their transposes); gradient checkpointing adds the recompute's
                  2 all-gathers + 1 reduce-scatter (non-reentrant, transformers' default: the MLP's reduce-scatter is
                  not rerun, its output is saved by nothing and the recompute stops once the saved tensors are back)
                  or 2 + 2 (reentrant: the whole layer again)
  SP, per layer   comm_volume's formula for an attention call over S_sp tokens with the TP rank's H/T and H_kv/T heads
ratio = measured / formula; 1.00 means no byte beyond the formula.

Usage: python benchmarks/tp_comm_volume.py [--seq 1024] [--dtype bfloat16]
Writes benchmarks/results/tp_comm_volume.json and prints the table.
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
from comm_volume import SentBytes  # noqa: E402
from machine import write_gloo_report  # noqa: E402

import hf_seqpar  # noqa: E402
from hf_seqpar.estimate import DTYPE_BYTES, comm_bytes_per_layer, tp_comm_bytes_per_layer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = {  # a tiny Llama whose heads split over TP 2 or 4 and then Ulysses 2
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "vocab_size": 256,
}
# (world, tp_size, mode, gradient checkpointing: None, "non-reentrant" or "reentrant")
CASES = [(4, 2, "ring", None), (4, 2, "ring", "non-reentrant"), (4, 2, "ring", "reentrant"), (4, 2, "ulysses", None),
         (4, 2, "allgather", "non-reentrant"), (2, 2, "ring", None), (4, 4, "ring", "non-reentrant")]  # fmt: skip


def formula(mode: str, tp: int, sp: int, seq: int, ckpt: str | None, e: int, layers: int = SHAPE["num_hidden_layers"],
            batch: int = 1) -> dict:  # fmt: skip
    """{'tp': (forward, backward), 'sp': (forward, backward)} bytes one rank sends in one step; the backward holds
    the recompute's collectives under gradient checkpointing."""
    h, heads, kv, d = (SHAPE[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    fwd, bwd, recompute = tp_comm_bytes_per_layer(tp, batch, seq // sp, h, e, reentrant=ckpt == "reentrant")
    again = sum(recompute.values()) if ckpt else 0
    out = {"tp": (layers * sum(fwd.values()), layers * (sum(bwd.values()) + again))}
    if sp > 1:  # the recompute repeats the attention's forward
        afwd, abwd = comm_bytes_per_layer(mode, sp, 1, batch, seq // sp, heads // tp, kv // tp, d, e, 4)
        out["sp"] = (layers * sum(afwd.values()), layers * (sum(abwd.values()) + (sum(afwd.values()) if ckpt else 0)))
    return out


def _model(dtype: torch.dtype, ckpt: str | None):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, attention_dropout=0.0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).train()
    if ckpt:
        model.activation_checkpointing_enable({"use_reentrant": ckpt == "reentrant"})
    return model


def measure(mode: str, tp: int, seq: int, dtype: str, ckpt: str | None, groups=None) -> dict:
    """On every rank of an initialised world of sp x tp ranks: one training step's bytes sent, by group."""
    world = dist.get_world_size()
    sp = world // tp
    cfg = hf_seqpar.SeqParConfig(sp_size=sp, tp_size=tp, mode=mode)
    groups = groups or hf_seqpar.init_groups(cfg)
    model = _model(getattr(torch, dtype), ckpt)
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)
    ids = torch.randint(3, SHAPE["vocab_size"], (seq,), generator=torch.Generator().manual_seed(1))

    def base(features):
        row = torch.stack([f["input_ids"] for f in features])
        return {"input_ids": row, "labels": row.clone()}

    batch = hf_seqpar.SequenceShardingCollator(base, config=cfg, groups=groups)([{"input_ids": ids}])
    assert batch["input_ids"].shape[1] == seq // sp, batch["input_ids"].shape  # no padding: the formula's S_sp
    label = {groups.tp_group: "tp", groups.sp_group: "sp"}
    label.update({g: "sp" for pair in groups.splits.values() for g in pair if g is not None})
    with SentBytes(label) as fwd:
        loss = model(**batch, num_items_in_batch=torch.tensor(seq - 1)).loss
    with SentBytes(label) as bwd:
        loss.backward()
    want = formula(mode, tp, sp, seq, ckpt, DTYPE_BYTES[dtype])
    measured = {g: (int(fwd.by_group.get(g, 0)), int(bwd.by_group.get(g, 0))) for g in want}
    return {
        "world": world, "tp": tp, "sp": sp, "mode": mode, "checkpointing": ckpt, "seq": seq, "dtype": dtype,
        "measured": measured, "formula": want,
        "by_collective": {"fwd": {k: int(v) for k, v in fwd.sent.items()},
                          "bwd": {k: int(v) for k, v in bwd.sent.items()}},
        "unlabelled": int(fwd.by_group.get(None, 0) + bwd.by_group.get(None, 0)),
    }  # fmt: skip


def _worker(rank, world, store, opts, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = [measure(mode, tp, opts.seq, opts.dtype, ckpt) for w, tp, mode, ckpt in CASES if w == world]
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS / "tp_comm_volume.json")
    opts = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for world in sorted({w for w, *_ in CASES}):
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), opts, queue), nprocs=world)
        per_rank = queue.get()
        for i, row in enumerate(per_rank[0]):
            row["every_rank_equal"] = all(r[i]["measured"] == row["measured"] for r in per_rank)
            row["equal"] = row["every_rank_equal"] and row["measured"] == row["formula"] and not row["unlabelled"]
            rows.append(row)
            parts = "   ".join(
                f"{g.upper()} fwd {m[0] / 2**20:7.3f} MiB ({row['formula'][g][0] / 2**20:7.3f}) bwd "
                f"{m[1] / 2**20:7.3f} MiB ({row['formula'][g][1] / 2**20:7.3f})"
                for g, m in row["measured"].items()
            )
            print(f"TP {row['tp']} x SP {row['sp']} {row['mode']:<9} ckpt {row['checkpointing'] or 'off':<13} "
                  f"{parts}   {'= formula' if row['equal'] else 'DIFFERS'}", flush=True)  # fmt: skip
    report = write_gloo_report(opts, rows, shape=SHAPE)
    print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
